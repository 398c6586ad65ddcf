"""``mmsink sweep``: ``mmsink eval`` for every method x budget in one process (the model is loaded once
and re-wrapped between runs), then a table and a plot that compare methods at matched measured prefill
FLOPs, not only at matched budgets.

    mmsink sweep --model PATH --bench synthvqa --methods fastv,pdrop,dart,random,pool,visipruner \\
        --budgets 0.333,0.222,0.111 --adaptive visipruner --full --batch-size 8 --out DIR

Writes DIR/<run>.jsonl (answers, with .score.json and, when records were skipped, .errors.json),
DIR/sweep.json, DIR/sweep.md and DIR/sweep.png (when some run has a score). Re-running continues an
interrupted sweep: runs whose score file matches the settings and question set are skipped, a run cut
short resumes from its answers file. Methods that take no budget (none) run once. --num-processes N /
torchrun / accelerate launch run each eval data parallel (evals/parallel.py). Exit code as mmsink eval;
a run whose method cannot be applied is reported in the table and the others go on.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from mmsink.tools.loading import LoadError, check_out_dir, fail, parser

from . import parallel, vqa
from .eval import EvalError, Settings, add_common, interrupted, run_eval, setup

DEFAULT_METHODS = (
    "fastv,pdrop,dart,sparsevlm,visipruner,visionzip,scope,vispruner_iccv,divprune,cdpruner,random,pool"
)
DEFAULT_BUDGETS = "0.333,0.222,0.111"  # about 192 / 128 / 64 of LLaVA-1.5's 576 tokens


@dataclass
class Run:
    name: str
    settings: Settings


def split_list(text: str) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def plan_runs(methods, budgets, adaptive=(), full=False, opts=(), var=False, sink_forward=False):
    """The runs of a sweep, in order: full, then each method over the budgets, then adaptive ones."""
    from mmsink.pruners import REGISTRY

    for m in [*methods, *adaptive]:
        if m not in REGISTRY:
            raise ValueError(f"unknown method {m!r}; known methods: {', '.join(sorted(REGISTRY))}")
    runs = [Run("full", Settings())] if full else []  # the untouched model, the FLOPs reference
    for m in methods:
        options = vqa.parse_opts(opts, m)
        if not REGISTRY[m].uses_budget:
            runs.append(Run(m, Settings(m, None, options, var, sink_forward)))
            continue
        for text in budgets:
            budget = vqa.parse_budget(text)
            runs.append(Run(f"{m}-{text}", Settings(m, budget, options, var, sink_forward)))
    for m in adaptive:
        if not REGISTRY[m].uses_budget or REGISTRY[m].default_budget is not None:
            raise ValueError(f"method {m!r} has no adaptive (budget-free) mode")
        runs.append(Run(f"{m}-adaptive", Settings(m, None, vqa.parse_opts(opts, m), var, sink_forward)))
    return runs


def finished(path: Path, settings: Settings, model_id: str, bench: vqa.Bench) -> dict | None:
    """The summary of a completed run with these settings and this question set, else None."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    mine = json.loads(json.dumps(settings.meta()))
    same = all(summary.get(k) == v for k, v in mine.items())
    n = len(bench.questions) + len(bench.problems)
    if same and (summary.get("model_id"), summary.get("bench"), summary.get("questions")) == (
        model_id,
        bench.name,
        n,
    ):
        return summary
    return None


def row(run: Run, summary: dict) -> dict:
    keep = ("accuracy", "per_category", "mean_kept_tokens", "mean_kept_tokens_final", "mean_flops_ratio")
    keep += ("answered", "missing")
    return {
        "run": run.name,
        "method": run.settings.method,
        "budget": run.settings.budget,
        "options": run.settings.options,
        **{k: summary.get(k) for k in keep},
        "problems": summary.get("problems"),
    }


# ----------------------------------------------------------------------------- outputs


def fmt(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def categories(rows) -> list[str]:
    from .synthvqa import CATEGORIES

    found = {c for r in rows for c in (r.get("per_category") or {})}
    return [c for c in CATEGORIES if c in found] + sorted(found - set(CATEGORIES))


def write_markdown(path: Path, rows: list[dict], head: dict) -> None:
    cats = categories(rows)
    lines = [
        f"# Sweep: {head['model_id']} on {head['bench']} ({head['questions']} questions)",
        "",
        "FLOPs ratio: measured prefill FLOPs / the same inputs unpruned, mean over questions. Visual tokens:"
        " kept per decoder layer, averaged over the layers, and kept after the last pruning step (the last"
        " layer's), each a mean over questions.",
        "",
        "| run | method | budget | accuracy | "
        + " | ".join(cats)
        + " | visual tokens (mean over layers) | after last pruning | FLOPs ratio |",
        "|---" * (7 + len(cats)) + "|",
    ]
    for r in rows:
        if "error" in r:  # one cell for the message, the rest empty: as many cells as the header
            why = str(r["error"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['run']} | error: {why} |" + " |" * (5 + len(cats)))
            continue
        per = r.get("per_category") or {}
        cells = [
            r["run"],
            r["method"] or "full",
            "-" if r["budget"] is None else str(r["budget"]),
            fmt(r["accuracy"]),
            *[fmt(per.get(c)) for c in cats],
            fmt(r["mean_kept_tokens"], 1),
            fmt(r.get("mean_kept_tokens_final"), 1),
            fmt(r["mean_flops_ratio"], 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(path: Path, rows: list[dict], head: dict) -> None:
    """Accuracy vs measured FLOPs ratio: one line per method, single points for runs without a budget."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ok = [r for r in rows if r.get("mean_flops_ratio") is not None and r.get("accuracy") is not None]
    names = list(dict.fromkeys(r["method"] for r in ok if r["method"]))
    # a method keeps its colour and marker; 20 colours and 10 markers tell more methods apart than C0..C9
    from matplotlib import colormaps

    palette = colormaps["tab20"]
    color = {m: palette(i % 20) for i, m in enumerate(names)}
    shape = {m: "osD^v<>pPX"[i % 10] for i, m in enumerate(names)}
    lines: dict[str, list] = {}
    for r in ok:
        if r["method"] is None:
            ax.scatter([r["mean_flops_ratio"]], [r["accuracy"]], marker="*", s=160, c="black", label=r["run"])
        elif r["budget"] is None:
            ax.scatter(
                [r["mean_flops_ratio"]],
                [r["accuracy"]],
                marker="D",
                s=60,
                color=color[r["method"]],
                label=r["run"],
            )
        else:
            lines.setdefault(r["method"], []).append(r)
    for method, pts in lines.items():
        pts.sort(key=lambda r: r["mean_flops_ratio"])
        xs, ys = [r["mean_flops_ratio"] for r in pts], [r["accuracy"] for r in pts]
        ax.plot(xs, ys, marker=shape[method], color=color[method], label=method)
    ax.set_xlabel("prefill FLOPs ratio (measured, pruned / unpruned)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{head['model_id']} on {head['bench']} ({head['questions']} questions)")
    ax.grid(alpha=0.3)
    if ok:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    p = parser("sweep", __doc__)
    add_common(p)
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated budgets (tokens or fractions)")
    p.add_argument("--adaptive", default="", help="comma-separated methods also run without a budget")
    p.add_argument("--full", action="store_true", help="also run the unpruned model")
    p.add_argument("--out", default="sweep", help="output folder (default ./sweep)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_processes < 1:
        p.error("--batch-size and --num-processes must be >= 1")
    try:
        runs = plan_runs(
            split_list(args.methods),
            split_list(args.budgets),
            split_list(args.adaptive),
            args.full,
            args.opt,
            args.var,
            args.sink_forward,
        )
    except ValueError as e:
        p.error(str(e))
    if not runs:
        p.error("nothing to run: give --methods (with --budgets), --adaptive or --full")
    for r in runs:
        r.settings.config = args.config
    if args.num_processes > 1 and not parallel.launched():
        code = parallel.spawn("mmsink.evals.sweep", argv, args.num_processes)
        if code:
            raise SystemExit(code)
        return 0
    try:
        out = check_out_dir(args.out)  # before anything loads
    except LoadError as e:
        fail("sweep", e)
    lead = parallel.is_main()  # rank 0 alone prints and writes the sweep's files
    try:
        return sweep(args, runs, out, lead)
    except KeyboardInterrupt:
        interrupted("sweep", out)


def sweep(args, runs, out: Path, lead: bool) -> int:
    bench, model, processor, model_id = setup(args, "sweep")
    if bench.key is None:
        if lead:
            print("mmsink sweep: error: a sweep needs an answer key (synthvqa or --answers)", file=sys.stderr)
        raise SystemExit(1)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for i, run in enumerate(runs, 1):
        answers = out / f"{run.name}.jsonl"
        score = Path(f"{answers}.score.json")
        summary = parallel.from_main(partial(finished, score, run.settings, model_id, bench))
        if summary is not None:
            if lead:
                print(f"[{i}/{len(runs)}] {run.name}: done before, skipped", file=sys.stderr)
        else:
            if lead:
                print(f"[{i}/{len(runs)}] {run.name}", file=sys.stderr)
            try:
                summary = run_eval(
                    model,
                    processor,
                    bench,
                    run.settings,
                    answers,
                    args.batch_size,
                    args.max_new_tokens,
                    model_id,
                    args.seed,
                    not args.no_progress,
                    args.fast,
                )
            except EvalError as e:
                if lead:
                    print(f"mmsink sweep: {run.name}: {e}", file=sys.stderr)
                rows.append({"run": run.name, "method": run.settings.method, "error": str(e)})
                continue
        rows.append(row(run, summary))

    head = {
        "model_id": model_id,
        "bench": bench.name,
        "questions": len(bench.questions) + len(bench.problems),
    }
    if lead:
        (out / "sweep.json").write_text(json.dumps({**head, "runs": rows}, indent=1) + "\n", encoding="utf-8")
        write_markdown(out / "sweep.md", rows, head)
        if any(r.get("mean_flops_ratio") is not None and r.get("accuracy") is not None for r in rows):
            write_plot(out / "sweep.png", rows, head)
        else:  # nothing to plot: no empty figure (and no stale one from another sweep)
            (out / "sweep.png").unlink(missing_ok=True)
        print((out / "sweep.md").read_text(encoding="utf-8"))
    if not any(r.get("answered") for r in rows):
        if lead:
            print("mmsink sweep: no question could be answered", file=sys.stderr)
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
