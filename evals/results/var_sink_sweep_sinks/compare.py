"""Count answers that differ between two sweeps' runs of the same name (answers JSONL, by question_id).

    python evals/results/var_sink_sweep_sinks/compare.py runs/sweep_sinks runs/var_sinks [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def answers(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            out[r["question_id"]] = r["text"]
    return out


def compare(base: Path, other: Path) -> list[dict]:
    rows = []
    for f in sorted(other.glob("*.jsonl")):
        ref = base / f.name
        if not ref.exists():
            continue
        a, b = answers(ref), answers(f)
        common = a.keys() & b.keys()
        diff = sorted(q for q in common if a[q] != b[q])
        rows.append({"run": f.stem, "compared": len(common), "differ": len(diff), "first": diff[:5]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("other", type=Path)
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args()
    for d in (a.base, a.other):
        if not d.is_dir():
            p.error(f"not a folder: {d}")
    rows = compare(a.base, a.other)
    for r in rows:
        print(f"{r['run']}: {r['differ']} of {r['compared']} differ {r['first'] or ''}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
