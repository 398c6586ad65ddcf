"""``mmsink <command>``: each command is a module with a ``main(argv)``."""

from __future__ import annotations

import sys

# name: (module, one line for ``mmsink --help``); the modules load only when their command runs
COMMANDS = {
    "eval": (
        "mmsink.evals.eval",
        "answer a VQA question set (synthvqa or LLaVA JSONL), write answers, score",
    ),
    "sweep": ("mmsink.evals.sweep", "eval every method x budget; table and plot of accuracy against FLOPs"),
    "bench": ("mmsink.tools.bench", "time the pruned prefill and decode against the unpruned model"),
    "serve-bench": (
        "mmsink.tools.serve_bench",
        "largest batch that fits and its tokens/s through generate_fast, unpruned and pruned",
    ),
    "demo": ("mmsink.demo.app", "Gradio page: baseline and mmsink answers side by side"),
    "inspect": (
        "mmsink.tools.inspector",
        "per-layer sink diagnostics for one image and question (JSON, PNG)",
    ),
    "calibrate": (
        "mmsink.tools.calibrate",
        "find a model's sink dimensions and fusion layer; write a config",
    ),
    "convert-llava": ("mmsink.tools.convert_llava", "convert an original-LLaVA checkpoint to transformers'"),
    "export-lmms": ("mmsink.lmms.export", "write synthvqa as an on-disk dataset plus an lmms-eval task"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: mmsink COMMAND [options]   (mmsink COMMAND --help for a command's options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        if argv:
            print(f"\nmmsink: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    import importlib

    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
