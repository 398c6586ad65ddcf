"""``mmsink <command>``: each command is a module with a ``main(argv)``."""

from __future__ import annotations

import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "bench": "mmsink.tools.bench",
        "eval": "mmsink.evals.eval",
        "sweep": "mmsink.evals.sweep",
        "convert-llava": "mmsink.tools.convert_llava",
        "calibrate": "mmsink.tools.calibrate",
        "inspect": "mmsink.tools.inspector",
        "demo": "mmsink.demo.app",
    }
    if not argv or argv[0] not in commands:
        print(f"usage: mmsink {{{','.join(commands)}}} [options]   (mmsink COMMAND --help for each)")
        return 2
    import importlib

    importlib.import_module(commands[argv[0]]).main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
