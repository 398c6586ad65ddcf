"""Accuracy per method and budget of two models' sweeps side by side, read from their *.score.json files.

    python evals/results/synthvqa_sweep_sinks/side_by_side.py NEW_DIR FIRST_DIR [--labels A,B] [--out PREFIX]

Reads score files rather than sweep.json so that a sweep cut short still gives its finished runs. Writes
PREFIX.md and PREFIX.json (default: print the Markdown only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BUDGETS = (0.333, 0.222, 0.111)
# run.sh's order; methods not listed follow in name order
ORDER = ("full", "none", "random", "pool", "fastv", "pdrop", "dart", "visipruner", "visipruner (adaptive)",
         "visionzip", "divprune", "cdpruner", "scope", "vispruner_iccv", "sparsevlm", "orthorank", "replay")


def load(folder: Path) -> dict[tuple[str, float | None], dict]:
    """(method, budget) -> score; unpruned: ('full', None); adaptive: ('<m> (adaptive)', None)."""
    out = {}
    for f in sorted(folder.glob("*.score.json")):
        s = json.loads(f.read_text(encoding="utf-8"))
        run = f.name.removesuffix(".jsonl.score.json")
        if run == "full":
            key = ("full", None)
        elif s.get("budget") is None:
            key = (s["method"] if run == s["method"] else f"{s['method']} (adaptive)", None)
        else:
            key = (s["method"], round(float(s["budget"]), 3))
        out[key] = {"run": run, "accuracy": s["accuracy"], "flops": s.get("mean_flops_ratio"),
                    "questions": s.get("questions"), "answered": s.get("answered"), "bench": s.get("bench")}
    return out


def ranks(scores: dict, budget: float, among: set[str]) -> dict[str, int]:
    """1 = best accuracy among `among` at this budget (ties share the better rank)."""
    acc = {m: v["accuracy"] for (m, b), v in scores.items() if b == budget and m in among}
    return {m: 1 + sum(o > a for o in acc.values()) for m, a in acc.items()}


def cell(v: dict | None) -> str:
    return "-" if v is None else f"{100 * v['accuracy']:.1f} / {v['flops']:.2f}"


def table(new: dict, first: dict, labels=("new", "first")) -> tuple[str, list[dict]]:
    seen = {m for m, _ in list(new) + list(first)}
    methods = [m for m in ORDER if m in seen] + sorted(seen - set(ORDER))
    # ranks only among methods finished in both models, so a run missing on one side moves no rank
    both = {b: {m for m, k in new if k == b} & {m for m, k in first if k == b} for b in BUDGETS}
    rk_new = {b: ranks(new, b, both[b]) for b in BUDGETS}
    rk_first = {b: ranks(first, b, both[b]) for b in BUDGETS}
    head = "| method |" + "".join(
        f" {round(100 * b)} %: {labels[0]} | {labels[1]} | diff (points) | rank {labels[0]} / {labels[1]} |"
        for b in BUDGETS)
    lines = [head, "|---|" + "---|---|---|---|" * len(BUDGETS)]
    rows = []
    for m in methods:
        budgets = (None,) if any(k == (m, None) for k in list(new) + list(first)) else BUDGETS
        parts = []
        for b in BUDGETS:
            key = (m, None) if budgets == (None,) else (m, b)
            if budgets == (None,) and b != BUDGETS[0]:
                parts.append(" | | | |")
                continue
            a, c = new.get(key), first.get(key)
            d = "-" if a is None or c is None else f"{100 * (a['accuracy'] - c['accuracy']) + 0.0:+.1f}"
            r = "" if key[1] is None else f"{rk_new[b].get(m, '-')} / {rk_first[b].get(m, '-')}"
            parts.append(f" {cell(a)} | {cell(c)} | {d} | {r} |")
            rows.append({"method": m, "budget": key[1], "new": a, "first": c})
        lines.append(f"| {m} |" + "".join(parts))
    return "\n".join(lines) + "\n", rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("new", type=Path, help="folder with the new model's *.score.json")
    p.add_argument("first", type=Path, help="folder with the first model's *.score.json")
    p.add_argument("--labels", default="new,first", help="the two folders' column names")
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    a = p.parse_args()
    for d in (a.new, a.first):
        if not d.is_dir() or not any(d.glob("*.score.json")):
            p.error(f"no *.score.json in {d}")
    labels = tuple(a.labels.split(","))
    if len(labels) != 2 or not all(labels):
        p.error(f"--labels needs two comma-separated names, got {a.labels!r}")
    new, first = load(a.new), load(a.first)
    md, rows = table(new, first, labels)
    md = ("Cells: accuracy (%) / mean prefill FLOPs ratio; '-': no finished run. Ranks among the methods "
          "with a finished run at that budget in both models.\n\n" + md)
    print(md)
    if a.out:
        a.out.with_suffix(".md").write_text(md, encoding="utf-8")
        out = {"new": str(a.new), "first": str(a.first), "labels": labels, "rows": rows}
        a.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
