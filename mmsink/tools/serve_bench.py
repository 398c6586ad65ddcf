"""``mmsink serve-bench``: serving throughput on real-size architectures with random weights.

For each shape and method: the largest batch of identical image prompts that ``generate_fast`` runs
(prefill + N greedy tokens) without running out of device memory, and the tokens/s at that batch:
batch * new tokens / median time of one ``generate_fast`` call. Pruning shrinks the KV cache, which is
what bounds the batch. Where the device's memory can be read (CUDA), the batch is predicted
(``predicted_batch``): two small batches are run, a line peak(b) = fixed + per sequence * b is fitted to
their peak memory, the batch that fills 1 - ``--margin`` of the capacity above the line's fixed part is
run, then only batches near it (within 1/``--resolution``); each row says how its batch was found.
Elsewhere (CPU) the batch is doubled from
``--first-batch``, then bisected (``largest_batch``), up to ``--max-batch``. ``--kv``: KV-cache modes
crossed with the methods (each row wraps the model with the method and the mode): the row also gives the
KV bytes per sequence, read from the tensors of the decoders ``generate_fast`` kept (keys / values, a
window's raw keys, a quantized store's codes, scales, ring and exact entries), and the peak device memory
at the largest batch. A combination ``wrap`` or ``generate_fast`` refuses is a row saying so.
``--prefill-batch N``: ``generate_fast(prefill_batch=N)``, the prompts prefilled in row chunks of at most N
(one chunk's prefill memory at a time) before all rows decode together (default: off, the whole batch at
once, as rows measured before it). JSON and a Markdown table (``--out``); progress on stderr.
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
    attempt,
    max_batch: int = 256,
    resolution: int = 8,
    deadline: float | None = None,
    first: int = 1,
    late=None,
):
    """(largest batch that fit, {batch: fit?} in the order tried, whether the deadline cut the search).
    ``attempt(b)`` -> True when batch b fits. Doubling from ``first`` to the first failure (or
    ``max_batch``), then bisection (below ``first`` too, when it does not fit) until the gap between fit
    and failure is at most max(1, fit // resolution). ``deadline``: a perf_counter time after which no new
    batch is tried; ``late(b)`` -> True when batch b is not to be started replaces that rule (the search
    ``predicted_batch`` falls back to)."""
    tried, best, bad = {}, 0, None
    if late is None:

        def late(b: int) -> bool:
            return deadline is not None and time.perf_counter() > deadline

    b = max(1, min(first, max_batch))
    while True:
        tried[b] = attempt(b)
        if not tried[b]:
            bad = b
            break
        best = b
        if b >= max_batch:
            return best, tried, False
        b = min(2 * b, max_batch)
        if late(b):
            return best, tried, True
    while bad - best > max(1, best // resolution):
        mid = (best + bad) // 2
        if late(mid):
            return best, tried, True
        tried[mid] = attempt(mid)
        best, bad = (mid, bad) if tried[mid] else (best, mid)
    return best, tried, False


MARGIN = 0.1  # of the memory above the fixed part, kept free (fragmentation, driver memory of graphs)


def predicted_batch(
    probe,
    capacity: int,
    max_batch: int = 256,
    resolution: int = 8,
    deadline: float | None = None,
    first: int = 8,
    margin: float = MARGIN,
    now=time.perf_counter,
) -> dict:
    """The largest batch that fits, predicted from memory. ``probe(b)`` -> (fits, peak bytes or None).

    Batches ``first`` and max(2 * first, 8) are run; the line through their peaks, fixed + per_seq * b,
    gives the predicted batch: the largest b with per_seq * b <= (1 - margin) * (``capacity`` - fixed)
    (``max_batch`` at most). That batch is run; if it fits, batches one step of max(1, b // resolution)
    above it are run until one fails (or ``max_batch``); if it does not, one batch just far enough below it
    for a fit there to close the gap, then bisection. The search ends when the smallest failure is at most
    max(1, largest fit // resolution) above the largest fit (as ``largest_batch``'s), or at ``deadline``
    (a ``now()`` time): once two batches fit, no batch is started whose duration, on the line through the
    durations of the two largest fits, would end past it. A small batch that does not fit leaves bisection
    only; a peak that cannot be read, ``largest_batch``'s doubling and bisection from the second batch.
    Returns dict(best, tried {b: fits} in order, cut (by the deadline), not_run ([batch, expected s] the
    deadline kept from starting, or None), found (predicted: the predicted batch, a step above it failed
    or it is ``max_batch``; stepped up: above the prediction; bisected: below it; not verified: the
    deadline came first; doubled: no prediction), predicted, first_oom (smallest failure, None: none),
    per_seq_bytes, fixed_bytes, peaks {b: bytes of the fits}, seconds {b: duration of each probe})."""
    tried, peaks, seconds = {}, {}, {}
    out = dict(best=0, cut=False, not_run=None, found=None, predicted=None, first_oom=None)
    out.update(per_seq_bytes=None, fixed_bytes=None, tried=tried, peaks=peaks, seconds=seconds)

    def late(b: int | None = None) -> bool:
        if deadline is None:
            return False
        fits = sorted(x for x in peaks if x in seconds)[-2:]
        if b is None or len(fits) < 2:
            out["cut"] = now() > deadline
            return out["cut"]
        (x0, x1), (y0, y1) = fits, (seconds[x] for x in fits)
        expect = max(0.0, y1 + (y1 - y0) / (x1 - x0) * (b - x1))
        if now() + expect > deadline:
            out["cut"], out["not_run"] = True, [b, round(expect, 1)]
        return out["cut"]

    def run(b: int) -> bool:
        t0 = now()
        fits, peak = probe(b)
        seconds[b] = round(now() - t0, 3)
        tried[b] = bool(fits)
        if fits:
            peaks[b] = peak
            out["best"] = max(out["best"], b)
        elif out["first_oom"] is None or b < out["first_oom"]:
            out["first_oom"] = b
        return bool(fits)

    def gap_closed() -> bool:
        best, bad = out["best"], out["first_oom"]
        if bad is None:
            return best >= max_batch
        return bad - best <= max(1, best // resolution)

    def bisect(down_first: bool = False) -> dict:  # between the largest fit and the smallest failure
        while not gap_closed():
            best, bad = out["best"], out["first_oom"]
            if bad is None:  # every batch so far fits: one step up
                b = min(max_batch, best + max(1, best // resolution))
            elif down_first:  # a fit here closes the gap (b // resolution >= bad - b)
                b = max(best + 1, bad - max(1, bad // (resolution + 1)))
            else:
                b = (best + bad) // 2
            down_first = False
            if late(b):
                break
            run(b)
        return out

    def found() -> dict:
        pred, best = out["predicted"], out["best"]
        if pred is None:  # no peak to fit or a cap at the first batch (doubled), a small batch failed
            out["found"] = "doubled" if unread or out["first_oom"] is None else "bisected"
        elif pred not in tried and best < pred:  # the deadline kept the predicted batch from running
            out["found"] = "not verified"
        else:
            out["found"] = "predicted" if best == pred else "stepped up" if best > pred else "bisected"
        return out

    p1 = max(1, min(first, max_batch))
    unread = False
    if not run(p1):
        bisect()
        return found()
    p2 = min(max_batch, max(2 * p1, 8))
    if p2 == p1 or late():
        return found()
    if not run(p2):
        bisect()
        return found()
    if peaks[p1] is None or peaks[p2] is None:  # nothing to fit: doubling from p2, then bisection
        unread = True
        known = lambda b: tried[b] if b in tried else run(b)  # noqa: E731 (p2 is not run again)
        largest_batch(known, max_batch, resolution, first=p2, late=late)
        return found()
    per_seq = (peaks[p2] - peaks[p1]) / (p2 - p1)
    fixed = peaks[p1] - per_seq * p1
    out["per_seq_bytes"], out["fixed_bytes"] = per_seq, fixed
    room = (1 - margin) * (capacity - fixed)  # an error in per_seq errs by its share of this room
    pred = max_batch if per_seq <= 0 else max(1, min(max_batch, int(room // per_seq)))
    out["predicted"] = pred
    if pred > p2:  # else the line puts the limit at or below a batch that fit: steps up from it
        if late(pred):
            return found()
        if not run(pred):
            bisect(down_first=True)
            return found()
    bisect()
    return found()


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
    ``opts``: max_batch, first_batch, resolution, margin, seconds (search time), reps, clock, compile,
    prefill_batch (``generate_fast``'s; None or absent: off), check (called with the batch before every
    call: a fake memory limit in tests), memory and capacity (tests: batch -> fake peak bytes, and the
    bytes that fit; on CUDA the allocator's peak reserved bytes over a batch's calls, and free + reserved
    memory before the search). With a memory reading the search is ``predicted_batch``'s and every batch
    it runs is timed there (the largest needs no further calls; ``seconds`` also bounds the batches
    started, by their expected durations); without one, ``largest_batch``'s."""
    import mmsink

    check = opts.get("check") or (lambda b: None)
    times: dict = {}
    cuda = next(model.parameters()).is_cuda
    last: dict = {}
    measured: dict = {}  # batch -> what a timed attempt read there (KV bytes, peak, tokens)
    memory, capacity = opts.get("memory"), opts.get("capacity")
    if cuda and memory is None:
        release(model)
        capacity = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved()

    def call(b: int, inputs: dict) -> None:
        check(b)
        out = mmsink.generate_fast(
            model,
            max_new_tokens=new_tokens,
            compile=opts["compile"],
            prefill_batch=opts.get("prefill_batch"),
            **inputs,
        )
        last["out"] = out

    def attempt(b: int, reps: int = 0, final: bool = False) -> bool:
        t0 = time.perf_counter()
        inputs = repeat_batch(one, b)
        last["read"] = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        retries = alloc_retries() if cuda else None
        try:  # two untimed calls: the second captures the prefill tail's graph (memory too)
            call(b, inputs)
            call(b, inputs)
            times[b] = [opts["clock"](lambda: call(b, inputs)) for _ in range(reps)]
            if memory is not None:
                last["read"] = memory(b)
            elif cuda:  # what the allocator held at most: a later batch needs that much from the device
                last["read"] = torch.cuda.max_memory_reserved()
            if final:  # before ``release`` drops the decoders
                measured[b] = dict(
                    kv_bytes=kv_bytes(model),
                    peak=torch.cuda.max_memory_allocated() if cuda else None,
                    peak_reserved=torch.cuda.max_memory_reserved() if cuda else None,
                    alloc_retries=alloc_retries() - retries if cuda else None,
                    tokens=last["out"][0, one["input_ids"].shape[1] :].tolist(),
                )
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
        read = f", peak {last['read'] / 2**30:.1f} GiB" if ok and last["read"] is not None else ""
        say(f"  batch {b}: {'fits' if ok else 'out of memory'}{read} ({time.perf_counter() - t0:.1f} s)")
        return ok

    deadline = time.perf_counter() + opts["seconds"]
    first = opts.get("first_batch", 1)
    if capacity is None:
        best, tried, cut = largest_batch(attempt, opts["max_batch"], opts["resolution"], deadline, first)
        fails = [b for b, ok in tried.items() if not ok]
        search = dict(found="doubled", first_oom=min(fails) if fails else None, probes=len(tried))
    else:

        def probe(b: int):  # every batch timed: the one that ends largest needs no further calls
            return attempt(b, opts["reps"], final=True), last["read"]

        margin = opts.get("margin", MARGIN)
        s = predicted_batch(probe, capacity, opts["max_batch"], opts["resolution"], deadline, first, margin)
        best, tried, cut = s["best"], s["tried"], s["cut"]
        keys = ("found", "predicted", "first_oom", "not_run", "per_seq_bytes", "fixed_bytes")
        search = {k: s[k] for k in keys}
        search.update(probes=len(tried), capacity_bytes=capacity, margin=margin)
        search["peaks"] = {str(k): v for k, v in s["peaks"].items()}
        search["seconds"] = {str(k): v for k, v in s["seconds"].items()}
        if s["predicted"] is not None:
            say(
                f"  fit: {s['per_seq_bytes'] / 2**20:.0f} MiB per sequence + {s['fixed_bytes'] / 2**30:.1f} "
                f"GiB; predicted batch {s['predicted']} (capacity {capacity / 2**30:.1f} GiB, margin "
                f"{margin}); found {s['found']}"
            )
    row = dict(max_batch=best, tried={str(k): v for k, v in tried.items()}, search_cut_by_time=cut)
    row["search"] = search
    if best and (best in measured or attempt(best, opts["reps"], final=True)):
        row["times_s"] = times[best]
        row["tokens_per_s"] = best * new_tokens / statistics.median(times[best])
        m = measured[best]
        row["kv_bytes"] = m["kv_bytes"]
        row["kv_bytes_per_seq"] = None if m["kv_bytes"] is None else m["kv_bytes"] / best
        row["peak_bytes"] = m["peak"]
        row["peak_reserved_bytes"] = m["peak_reserved"]
        row["alloc_retries"] = m["alloc_retries"]
        row["tokens"] = m["tokens"]
    return row


def alloc_retries() -> int:
    """The CUDA caching allocator's retries so far (a failed allocation that freed its cached blocks and
    tried again: a batch this close to the memory's end pays for them in time)."""
    return torch.cuda.memory_stats().get("num_alloc_retries", 0)


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
                    what = f"largest batch {row['max_batch']} ({row['search']['found']}), " + (
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
        clear(model)
        # unpruned without a kv mode: prune="none", whose prefill hands off before the first layer, so the
        # layers write straight into the decoder's buffers; the bare model's prompt cache would sit beside
        # them at the fill, doubling the unpruned row's KV at its peak
        prune = method if method != "none" else ("none" if kv is None else None)
        mmsink.wrap(model, prune=prune, budget=budget, kv=kv)
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


NOT_SAVED = ("clock", "check", "memory")


def release_all() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def markdown(res: dict) -> str:
    rows = res["rows"]
    predicted = any((r.get("search") or {}).get("predicted") is not None for r in rows)
    first, res_n, cap = res.get("first_batch", 1), res["resolution"], res["max_batch"]
    if predicted:
        search = (
            f"Largest batch predicted: batches {first} and {max(2 * first, 8)} run, a line fitted to their "
            "peak memory (the allocator's peak reserved bytes) = fixed + per sequence x batch, the batch "
            f"that fills {1 - res.get('margin', MARGIN):.0%} of the capacity above the fixed part run, then "
            f"steps of 1/{res_n} above it while they fit, or below "
            f"it (a step, then bisection) until the first failure is within 1/{res_n} of the largest fit "
            f"(cap {cap}). Found by: predicted = the predicted batch, a step above it failed (or the cap); "
            "stepped up = above the prediction; bisected = below it; not verified = the time cap came "
            "first (the batch that fit is a lower bound); doubled = no memory reading. "
            "Fit MiB / seq: the line's slope"
        )
    else:
        search = f"Largest batch: doubled from {first}, then bisected to within 1/{res_n} (cap {cap})"
    chunk = res.get("prefill_batch")
    prefill = (
        "Prefill: the whole batch at once"
        if chunk is None
        else f"Prefill: in row chunks of at most {chunk} (`prefill_batch={chunk}`: one chunk's prefill "
        "memory at a time), then one decode of the whole batch"
    )
    lines = [
        f"Serving throughput, {res['device']}, {res['dtype']}, random weights: identical prompts (one image, "
        f"35 + 29 text tokens), greedy `generate_fast` of {res['new_tokens']} new tokens, compile "
        f"{'off' if res['compile'] is False else 'auto'}. {prefill}. {search}; first OOM: the smallest "
        f"batch that did not fit. Tokens/s = batch x new tokens / median time of {res['reps']} calls at "
        "that batch (prefill included). Ratio against the same shape's "
        "unpruned row without a kv mode. KV MiB / seq: the KV tensors of the decoders `generate_fast` kept "
        "at that batch, divided by it (buffers as allocated, slots rounded up to 128); "
        "peak GiB: the device's peak allocation over those calls, weights included (with the allocator's "
        "retries over them where there were any: a batch at the memory's end frees and allocates again).",
        "",
        "| shape | method | budget | kv | largest batch | found by | probes | first OOM | fit MiB / seq "
        "| s per call | tokens/s | vs unpruned | KV MiB / seq | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {
        r["shape"]: r.get("tokens_per_s")
        for r in rows
        if r["method"] == "none" and r.get("kv", "none") == "none"
    }
    for r in rows:
        head = (r["shape"], r["method"], r["budget"] or "-", r.get("kv", "none"))
        if "refused" in r:
            lines.append(bench.md_row(*head, "refused: " + r["refused"].replace("|", "/"), *["-"] * 9))
            continue
        tps = r.get("tokens_per_s")
        ref = base.get(r["shape"])
        s = r.get("search") or {}
        how = s.get("found", "-")
        if s.get("predicted") is not None:
            how += f" ({s['predicted']})"
        if r["search_cut_by_time"]:
            skip = s.get("not_run")
            how += ", search cut by time" + (f" (batch {skip[0]} not run: ~{skip[1]:.0f} s)" if skip else "")
        kv, peak, fit = r.get("kv_bytes_per_seq"), r.get("peak_bytes"), s.get("per_seq_bytes")
        lines.append(
            bench.md_row(
                *head,
                r["max_batch"],
                how,
                s.get("probes", len(r["tried"])),
                s.get("first_oom") or "-",
                f"{fit / 2**20:.0f}" if fit is not None else "-",
                f"{statistics.median(r['times_s']):.2f}" if tps else "-",
                f"{tps:.0f}" if tps else "-",
                f"{tps / ref:.2f}x" if tps and ref else "-",
                f"{kv / 2**20:.1f}" if kv is not None else "-",
                (f"{peak / 2**30:.1f}" if peak is not None else "-")
                + (f" ({r['alloc_retries']} retries)" if r.get("alloc_retries") else ""),
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
    ap.add_argument(
        "--seconds", type=float, default=90, help="search time per row before it stops (a guard: default 90)"
    )
    ap.add_argument(
        "--margin",
        type=float,
        default=MARGIN,
        help=f"share of the memory above the fixed part the predicted batch leaves free (default {MARGIN})",
    )
    ap.add_argument(
        "--prefill-batch",
        type=int,
        default=None,
        help="prefill in row chunks of at most this many (generate_fast's prefill_batch; default: off)",
    )
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
    if a.prefill_batch is not None and a.prefill_batch < 1:
        ap.error(f"--prefill-batch must be >= 1, got {a.prefill_batch}")
    if not 0 <= a.margin < 1 or a.resolution < 1:
        ap.error(f"--margin must be within [0, 1) and --resolution >= 1, got {a.margin}, {a.resolution}")
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
        margin=a.margin,
        reps=a.reps,
        seconds=a.seconds,
        compile=None if a.compile == "auto" else False,
        prefill_batch=a.prefill_batch,
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
