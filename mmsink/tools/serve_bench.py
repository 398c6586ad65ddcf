"""``mmsink serve-bench``: serving throughput on real-size architectures with random weights.

For each shape and method: the largest batch of identical image prompts that ``generate_fast`` runs
(prefill + N greedy tokens) without running out of device memory (batch doubled from 1, then bisected
between the last fit and the first out-of-memory, up to ``--max-batch``), and the tokens/s at that batch:
batch * new tokens / median time of one ``generate_fast`` call. Pruning shrinks the KV cache, which is
what bounds the batch. JSON and a Markdown table (``--out``); progress on stderr.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from . import bench


def largest_batch(attempt, max_batch: int = 256, resolution: int = 8, deadline: float | None = None):
    """(largest batch that fit, {batch: fit?} in the order tried, whether the deadline cut the search).
    ``attempt(b)`` -> True when batch b fits. Doubling from 1 to the first failure (or ``max_batch``),
    then bisection until the gap between fit and failure is at most max(1, fit // resolution).
    ``deadline``: a perf_counter time after which no new batch is tried."""
    tried, best, bad = {}, 0, None

    def late() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    b = 1
    while True:
        tried[b] = attempt(b)
        if not tried[b]:
            bad = b
            break
        best = b
        if b >= max_batch or late():
            return best, tried, b < max_batch
        b = min(2 * b, max_batch)
    while bad - best > max(1, best // resolution):
        if late():
            return best, tried, True
        mid = (best + bad) // 2
        tried[mid] = attempt(mid)
        best, bad = (mid, bad) if tried[mid] else (best, mid)
    return best, tried, False


def repeat_batch(one: dict, b: int) -> dict:
    """Inputs of one prompt repeated to batch ``b`` on their device (every tensor's first dim is the
    batch for the LLaVA families)."""
    return {k: v.repeat(b, *[1] * (v.dim() - 1)) for k, v in one.items()}


def release(model) -> None:
    """Free what generate_fast keeps on the model (decoders, graphs) and the allocator's cached blocks."""
    from ..fast import clear

    clear(model)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def serve_row(model, one: dict, new_tokens: int, opts: dict, say) -> dict:
    """Search the largest batch for the model as it is wrapped now, then time ``reps`` calls at it.
    ``opts``: max_batch, resolution, seconds (search time), reps, clock, compile, check (called with the
    batch before every call: a fake memory limit in tests)."""
    import mmsink

    check = opts.get("check") or (lambda b: None)
    times: dict = {}

    def call(b: int, inputs: dict) -> None:
        check(b)
        mmsink.generate_fast(model, max_new_tokens=new_tokens, compile=opts["compile"], **inputs)

    def attempt(b: int, reps: int = 0) -> bool:
        t0 = time.perf_counter()
        inputs = repeat_batch(one, b)
        try:  # two untimed calls: the second captures the prefill tail's graph (memory too)
            call(b, inputs)
            call(b, inputs)
            times[b] = [opts["clock"](lambda: call(b, inputs)) for _ in range(reps)]
            ok = True
        except (torch.OutOfMemoryError, RuntimeError) as e:  # a graph capture can fail as a RuntimeError
            text = str(e).lower()
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in text
            if not oom and not ("captur" in text and b > 1):  # an allocation failing mid-capture ends it
                raise
            say(f"  batch {b}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            ok = False
        finally:
            inputs = None  # the batch's tensors go before the allocator's cache is emptied
            release(model)
        say(f"  batch {b}: {'fits' if ok else 'out of memory'} ({time.perf_counter() - t0:.1f} s)")
        return ok

    deadline = time.perf_counter() + opts["seconds"]
    best, tried, cut = largest_batch(attempt, opts["max_batch"], opts["resolution"], deadline)
    row = dict(max_batch=best, tried={str(k): v for k, v in tried.items()}, search_cut_by_time=cut)
    if best and attempt(best, opts["reps"]):
        row["times_s"] = times[best]
        row["tokens_per_s"] = best * new_tokens / statistics.median(times[best])
    return row


def serve(
    shapes: list, budgets: list, methods: list, device: str, dtype, opts: dict, progress=None, save=None
):
    """Rows of (shape, method, budget, largest batch, times, tokens/s); ``budgets[i]`` for ``shapes[i]``.
    ``save(result so far)`` after every row (a run cut short keeps its rows)."""
    import mmsink

    from ..fast import clear

    say = progress or (lambda text: None)
    save = save or (lambda res: None)
    rows, start = [], time.perf_counter()
    res = dict(device=device, dtype=str(dtype), **{k: v for k, v in opts.items() if k not in NOT_SAVED})
    res["rows"] = rows
    for shape, budget in zip(shapes, budgets):
        model = bench.build(shape, device, dtype)
        model.generation_config.eos_token_id = None  # random weights: time fixed lengths
        one, n_vis = bench.bench_inputs(model, 1, 35, 29, device, dtype)
        for method in methods:
            b = None if method == "none" else budget
            say(f"[{shape} {method} {b or ''}] search up to batch {opts['max_batch']}")
            if method == "none":
                clear(model)  # the unwrapped model through generate_fast
            else:
                mmsink.wrap(model, prune=method, budget=b)
            row = dict(shape=shape, visual_tokens=n_vis, method=method, budget=b)
            row.update(serve_row(model, one, opts["new_tokens"], opts, say))
            if method != "none":
                mmsink.unwrap(model)
            rows.append(row)
            save(res)
            tps = row.get("tokens_per_s")
            say(
                f"[{shape} {method}] largest batch {row['max_batch']}, "
                + (f"{tps:.0f} tokens/s" if tps else "no timing")
                + f" ({time.perf_counter() - start:.0f} s so far)"
            )
        del model
        release_all()
    return res


NOT_SAVED = ("clock", "check")


def release_all() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def markdown(res: dict) -> str:
    lines = [
        f"Serving throughput, {res['device']}, {res['dtype']}, random weights: identical prompts (one image, "
        f"35 + 29 text tokens), greedy `generate_fast` of {res['new_tokens']} new tokens, compile "
        f"{'off' if res['compile'] is False else 'auto'}. Largest batch: doubled from 1, then bisected to "
        f"within 1/{res['resolution']} (cap {res['max_batch']}); tokens/s = batch x new tokens / median "
        f"time of {res['reps']} calls at that batch (prefill included). Ratio against the same shape's "
        "unpruned row.",
        "",
        "| shape | method | budget | largest batch | s per call | tokens/s | vs unpruned |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {r["shape"]: r.get("tokens_per_s") for r in res["rows"] if r["method"] == "none"}
    for r in res["rows"]:
        tps = r.get("tokens_per_s")
        ref = base.get(r["shape"])
        cut = " (search cut by time)" if r["search_cut_by_time"] else ""
        lines.append(
            bench.md_row(
                r["shape"],
                r["method"],
                r["budget"] or "-",
                f"{r['max_batch']}{cut}",
                f"{statistics.median(r['times_s']):.2f}" if tps else "-",
                f"{tps:.0f}" if tps else "-",
                f"{tps / ref:.2f}x" if tps and ref else "-",
            )
        )
    return "\n".join(lines)


def main(argv=None):
    from .loading import parser

    ap = parser("serve-bench", __doc__)
    ap.add_argument("--shapes", default="tiny-cpu", help="comma-separated bench shapes (LLaVA families)")
    ap.add_argument("--budgets", default="64", help="one token budget per shape, comma-separated")
    ap.add_argument("--methods", default="none,fastv,visionzip", help="comma-separated; 'none' = unpruned")
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda if any)",
    )
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    ap.add_argument("--max-batch", type=int, default=256, help="largest batch tried (default 256)")
    ap.add_argument("--resolution", type=int, default=8, help="bisect to within batch / this (default 8)")
    ap.add_argument("--reps", type=int, default=2, help="timed calls at the largest batch (default 2)")
    ap.add_argument("--seconds", type=float, default=90, help="search time per row before it stops")
    ap.add_argument("--compile", choices=["auto", "off"], default="off", help="torch.compile the step")
    ap.add_argument("--out", default=None, help="directory for JSON and Markdown")
    ap.add_argument("--name", default="serve", help="file stem (default serve)")
    a = ap.parse_args(argv)
    shapes, budgets = a.shapes.split(","), [int(b) for b in a.budgets.split(",")]
    if len(budgets) != len(shapes) or any(s not in bench.SHAPES for s in shapes):
        ap.error(f"--budgets needs one budget per shape, shapes from {sorted(bench.SHAPES)}")
    if any(bench.SHAPES[s].get("family") == "qwen2_vl" for s in shapes):
        ap.error("serve-bench runs the LLaVA families (Qwen's inputs do not repeat along the batch)")
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    opts = dict(
        new_tokens=a.new_tokens,
        max_batch=a.max_batch,
        resolution=a.resolution,
        reps=a.reps,
        seconds=a.seconds,
        compile=None if a.compile == "auto" else False,
        clock=bench.clock_for(a.device.startswith("cuda")),
    )
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    extra = dict(
        environment=bench.environment(),
        command="mmsink serve-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    )

    def save(res: dict) -> None:
        if a.out:
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{a.name}.json").write_text(json.dumps({**res, **extra}, indent=1))
            (out / f"{a.name}.md").write_text(f"Command: `{extra['command']}`\n\n{markdown(res)}\n")

    res = serve(shapes, budgets, a.methods.split(","), a.device, dtype, opts, say, save)
    res.update(extra)
    print(markdown(res))
    return res
