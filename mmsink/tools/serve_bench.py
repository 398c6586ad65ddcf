"""``mmsink serve-bench``: serving throughput on real-size architectures with random weights.

For each shape and method: the largest batch of identical image prompts that ``generate_fast`` runs
(prefill + N greedy tokens) without running out of device memory (batch doubled from 1, then bisected
between the last fit and the first out-of-memory, up to ``--max-batch``), and the tokens/s at that batch:
batch * new tokens / median time of one ``generate_fast`` call. Pruning shrinks the KV cache, which is
what bounds the batch. ``--kv``: KV-cache modes crossed with the methods (each row wraps the model with
the method and the mode): the row also gives the KV bytes per sequence, read from the tensors of the
decoders ``generate_fast`` kept (keys / values, a window's raw keys, a quantized store's codes, scales,
ring and exact entries), and the peak device memory at the largest batch. A combination ``wrap`` or
``generate_fast`` refuses is a row saying so. JSON and a Markdown table (``--out``); progress on stderr.
"""

from __future__ import annotations

import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from . import bench


def largest_batch(
    attempt, max_batch: int = 256, resolution: int = 8, deadline: float | None = None, first: int = 1
):
    """(largest batch that fit, {batch: fit?} in the order tried, whether the deadline cut the search).
    ``attempt(b)`` -> True when batch b fits. Doubling from ``first`` to the first failure (or
    ``max_batch``), then bisection (below ``first`` too, when it does not fit) until the gap between fit
    and failure is at most max(1, fit // resolution). ``deadline``: a perf_counter time after which no new
    batch is tried."""
    tried, best, bad = {}, 0, None

    def late() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    b = max(1, min(first, max_batch))
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


KV_FORMS = (
    "none, window<W> (the last W tokens + 4 sinks), int2 / int4 / int8 (KVSink quantization, sinks kept "
    "in full precision), lfps<K> (LFPS sparse decode, top K keys)"
)
# the decoders' KV tensors (lists per layer): keys / values (a quantized store's exact ring), a window's
# raw keys, a quantized store's codes, scales, offsets and exact entries
KV_FIELDS = ("k", "v", "raw", "kc", "ks", "kz", "vc", "vs", "vz", "xk", "xv")


def kv_modes(text: str) -> list[tuple[str, dict | None]]:
    """``--kv``'s comma-separated names -> [(name, the ``kv=`` of ``mmsink.wrap`` or None)]."""
    modes = []
    for name in text.split(","):
        name = name.strip()
        m = re.fullmatch(r"window([0-9]+)|int(2|4|8)|lfps([0-9]+)|none", name)
        if m is None or int(m[1] or m[3] or 1) < 1:
            raise ValueError(f"unknown kv mode {name!r}; modes: {KV_FORMS}")
        if m[1]:
            kv = {"window": int(m[1]), "sinks": 4}
        elif m[2]:
            kv = {"quant": name, "keep_sinks": True}
        elif m[3]:
            kv = {"sparse": "lfps", "topk": int(m[3])}
        else:
            kv = None
        modes.append((name, kv))
    return modes


def kv_bytes(model) -> int | None:
    """Bytes of the KV tensors of the decoders ``generate_fast`` keeps on ``model`` now (None: none)."""
    from ..fast.decode import STORE

    decoders = list(model.__dict__.get(STORE, {}).values())
    if not decoders:
        return None
    seen, total = set(), 0
    for dec in decoders:
        for name in KV_FIELDS:
            for t in getattr(dec, name, None) or []:
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


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
    """Search the largest batch for the model as it is wrapped now, then time ``reps`` calls at it, and
    there read the KV bytes per sequence, the peak device memory (CUDA) and sample 0's new tokens.
    ``opts``: max_batch, resolution, seconds (search time), reps, clock, compile, check (called with the
    batch before every call: a fake memory limit in tests)."""
    import mmsink

    check = opts.get("check") or (lambda b: None)
    times: dict = {}
    cuda = next(model.parameters()).is_cuda
    last: dict = {}

    def call(b: int, inputs: dict) -> None:
        check(b)
        out = mmsink.generate_fast(model, max_new_tokens=new_tokens, compile=opts["compile"], **inputs)
        last["out"] = out

    def attempt(b: int, reps: int = 0, final: bool = False) -> bool:
        t0 = time.perf_counter()
        inputs = repeat_batch(one, b)
        if final and cuda:
            torch.cuda.reset_peak_memory_stats()
        try:  # two untimed calls: the second captures the prefill tail's graph (memory too)
            call(b, inputs)
            call(b, inputs)
            times[b] = [opts["clock"](lambda: call(b, inputs)) for _ in range(reps)]
            if final:  # before ``release`` drops the decoders
                kv = kv_bytes(model)
                last["kv_bytes"] = kv
                last["peak"] = torch.cuda.max_memory_allocated() if cuda else None
                last["tokens"] = last["out"][0, one["input_ids"].shape[1] :].tolist()
            ok = True
        except (torch.OutOfMemoryError, RuntimeError) as e:  # a graph capture can fail as a RuntimeError
            text = str(e).lower()
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in text
            if not oom and not ("captur" in text and b > 1):  # an allocation failing mid-capture ends it
                raise
            say(f"  batch {b}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            ok = False
        finally:
            inputs = last["out"] = None  # the batch's tensors go before the allocator's cache is emptied
            release(model)
        say(f"  batch {b}: {'fits' if ok else 'out of memory'} ({time.perf_counter() - t0:.1f} s)")
        return ok

    deadline = time.perf_counter() + opts["seconds"]
    first = opts.get("first_batch", 1)
    best, tried, cut = largest_batch(attempt, opts["max_batch"], opts["resolution"], deadline, first)
    row = dict(max_batch=best, tried={str(k): v for k, v in tried.items()}, search_cut_by_time=cut)
    if best and attempt(best, opts["reps"], final=True):
        row["times_s"] = times[best]
        row["tokens_per_s"] = best * new_tokens / statistics.median(times[best])
        kv = last["kv_bytes"]
        row["kv_bytes"] = kv
        row["kv_bytes_per_seq"] = None if kv is None else kv / best
        row["peak_bytes"] = last["peak"]
        row["tokens"] = last["tokens"]
    return row


def serve(
    shapes: list,
    budgets: list,
    methods: list,
    device: str,
    dtype,
    opts: dict,
    progress=None,
    save=None,
    kvs: list | None = None,
):
    """Rows of (shape, method, budget, kv mode, largest batch, times, tokens/s, KV bytes, peak memory);
    ``budgets[i]`` for ``shapes[i]``, every method with every ``kvs`` entry ((name, ``kv=`` or None), as
    ``kv_modes`` gives; default: none). ``save(result so far)`` after every row (a run cut short keeps
    its rows). A combination ``wrap`` or ``generate_fast`` refuses (a ValueError of mmsink's): a row
    with ``refused``, its message."""
    from ..fast import clear

    say = progress or (lambda text: None)
    save = save or (lambda res: None)
    kvs = kvs or [("none", None)]
    rows, start = [], time.perf_counter()
    res = dict(device=device, dtype=str(dtype), **{k: v for k, v in opts.items() if k not in NOT_SAVED})
    res["rows"] = rows
    for shape, budget in zip(shapes, budgets):
        model = bench.build(shape, device, dtype)
        model.generation_config.eos_token_id = None  # random weights: time fixed lengths
        one, n_vis = bench.bench_inputs(model, 1, 35, 29, device, dtype)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        for method in methods:
            b = None if method == "none" else budget
            for kv_name, kv in kvs:
                label = f"[{shape} {method} {b or ''} kv {kv_name}]"
                say(f"{label} search up to batch {opts['max_batch']}")
                row = dict(
                    shape=shape, visual_tokens=n_vis, method=method, budget=b, kv=kv_name, kv_config=kv
                )
                row["weights_bytes"] = weights
                row.update(serve_kv_row(model, one, method, b, kv, opts, say))
                rows.append(row)
                save(res)
                tps = row.get("tokens_per_s")
                if "refused" in row:
                    what = f"refused: {row['refused']}"
                else:
                    what = f"largest batch {row['max_batch']}, " + (
                        f"{tps:.0f} tokens/s" if tps else "no timing"
                    )
                say(f"{label} {what} ({time.perf_counter() - start:.0f} s so far)")
        clear(model)
        del model
        release_all()
    return res


def serve_kv_row(model, one: dict, method: str, budget, kv, opts: dict, say) -> dict:
    """``serve_row`` with the model wrapped by ``method`` (``budget``) and ``kv`` (unwrapped after), or
    ``{"refused": message}`` where ``wrap`` or ``generate_fast`` refuses the combination."""
    import mmsink

    from ..fast import clear

    wrapped = False
    try:
        if method == "none" and kv is None:
            clear(model)  # the unwrapped model through generate_fast
        else:
            mmsink.wrap(model, prune=None if method == "none" else method, budget=budget, kv=kv)
            wrapped = True
        return serve_row(model, one, opts["new_tokens"], opts, say)
    except ValueError as e:
        text = str(e)
        if not text.startswith("mmsink:"):
            raise
        return dict(refused=text.splitlines()[0] if text else text)
    finally:
        if wrapped:
            mmsink.unwrap(model)
        release(model)


NOT_SAVED = ("clock", "check")


def release_all() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def markdown(res: dict) -> str:
    lines = [
        f"Serving throughput, {res['device']}, {res['dtype']}, random weights: identical prompts (one image, "
        f"35 + 29 text tokens), greedy `generate_fast` of {res['new_tokens']} new tokens, compile "
        f"{'off' if res['compile'] is False else 'auto'}. Largest batch: doubled from "
        f"{res.get('first_batch', 1)}, then bisected to "
        f"within 1/{res['resolution']} (cap {res['max_batch']}); tokens/s = batch x new tokens / median "
        f"time of {res['reps']} calls at that batch (prefill included). Ratio against the same shape's "
        "unpruned row without a kv mode. KV MiB / seq: the KV tensors of the decoders `generate_fast` kept "
        "at that batch, divided by it (buffers as allocated, slots rounded up to 128); "
        "peak GiB: the device's peak allocation over those calls, weights included.",
        "",
        "| shape | method | budget | kv | largest batch | s per call | tokens/s | vs unpruned "
        "| KV MiB / seq | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {
        r["shape"]: r.get("tokens_per_s")
        for r in res["rows"]
        if r["method"] == "none" and r.get("kv", "none") == "none"
    }
    for r in res["rows"]:
        head = (r["shape"], r["method"], r["budget"] or "-", r.get("kv", "none"))
        if "refused" in r:
            lines.append(bench.md_row(*head, "refused: " + r["refused"].replace("|", "/"), *["-"] * 5))
            continue
        tps = r.get("tokens_per_s")
        ref = base.get(r["shape"])
        cut = " (search cut by time)" if r["search_cut_by_time"] else ""
        kv, peak = r.get("kv_bytes_per_seq"), r.get("peak_bytes")
        lines.append(
            bench.md_row(
                *head,
                f"{r['max_batch']}{cut}",
                f"{statistics.median(r['times_s']):.2f}" if tps else "-",
                f"{tps:.0f}" if tps else "-",
                f"{tps / ref:.2f}x" if tps and ref else "-",
                f"{kv / 2**20:.1f}" if kv is not None else "-",
                f"{peak / 2**30:.1f}" if peak is not None else "-",
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
        "--kv", default="none", help=f"comma-separated KV-cache modes, each with every method: {KV_FORMS}"
    )
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda if any)",
    )
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    ap.add_argument("--max-batch", type=int, default=256, help="largest batch tried (default 256)")
    ap.add_argument(
        "--first-batch", type=int, default=1, help="the search doubles from this batch (default 1)"
    )
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
    if a.first_batch < 1 or a.max_batch < a.first_batch:
        ap.error("--first-batch must be >= 1 and <= --max-batch")
    try:
        kvs = kv_modes(a.kv)
    except ValueError as e:
        ap.error(f"--kv: {e}")
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    opts = dict(
        new_tokens=a.new_tokens,
        max_batch=a.max_batch,
        first_batch=a.first_batch,
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

    res = serve(shapes, budgets, a.methods.split(","), a.device, dtype, opts, say, save, kvs)
    res.update(extra)
    print(markdown(res))
    return res
