"""Where a ``generate_fast`` call's time goes per kv mode (issue 17: kv modes serve 2-5x slower than plain
decoding at equal batch): prefill (the wrapped model's forward), the decoder's ``fill``, graph capture,
and the decode steps, each timed with the device synchronized before and after (so the split is exact,
the total slightly slower than an unsynchronized call).

    python -m evals.kv_serving_phases --device cuda --shape llava-next-7b --batch 16 \\
        --kv none,window2048,int4,lfps512 --out $OUT/phases

Per mode, batch (``--batch``: comma-separated) and step (``--step``: ``default`` = ``generate_fast``'s own
choice, ``sdpa`` = the fused step with SDPA instead of the decode kernel, ``plain`` = the unfused step):
one untimed call (decoder built, step captured; with ``--compile auto`` a second, as serve-bench does),
then ``--reps`` timed calls; the table gives the median seconds of each phase and the decode ms per step.
``--prefill-batch N``: ``generate_fast(prefill_batch=N)`` (prefill sums its chunks). ``--trace``: per
row also one prefill (``max_new_tokens=1``) under the torch profiler: GPU busy and idle time, kernel time by
kind and by name, the longest idle gaps with the host's work then (``evals.ttft_breakdown``'s summary;
the phases' syncs off). ``--trace-decode``: per row a call of 1 and one of ``--new-tokens`` tokens under the
profiler, their difference per decode step (wall, GPU busy, kernel time by kind and by name: the step's
kernels, graph replays included). Random weights and inputs as ``mmsink serve-bench`` builds them (one
image, 35 + 29 text tokens, eos off). ``--tiny`` checks the command on a CPU (tiny-next-cpu, 4 new tokens,
batches of at most 4).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch


def synced(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """Seconds per phase of the current call (``wrap(fn, name)`` times every call of ``fn``)."""

    def __init__(self, device):
        self.device, self.now, self.inside, self.off = device, {}, set(), False

    @contextlib.contextmanager
    def quiet(self):
        """Calls inside run untimed (no syncs)."""
        self.off = True
        try:
            yield
        finally:
            self.off = False

    def wrap(self, fn, name):
        def run(*a, **k):
            if self.off or name in self.inside:  # (a subclass's method calling its parent's: timed once)
                return fn(*a, **k)
            self.inside.add(name)
            synced(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                synced(self.device)
                self.now[name] = self.now.get(name, 0.0) + time.perf_counter() - t0
                self.inside.discard(name)

        return run


STEPS = {"default": None, "sdpa": dict(fuse=True, attn="sdpa", gemv=True), "plain": {}}


def main(argv=None):
    import mmsink
    from mmsink.fast import clear
    from mmsink.fast import decode as fdec
    from mmsink.fast import generate as fgen
    from mmsink.kv import fast, fast_quant, fast_sparse
    from mmsink.tools.bench import bench_inputs, build, environment
    from mmsink.tools.serve_bench import kv_modes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llava-next-7b")
    ap.add_argument("--batch", default="16", help="comma-separated batch sizes")
    ap.add_argument("--kv", default="none,window2048,int4,lfps512")
    ap.add_argument("--method", default="none")
    ap.add_argument("--budget", type=int, default=320)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--step", default="default", help=f"comma-separated of {', '.join(STEPS)}")
    ap.add_argument("--compile", choices=["auto", "off"], default="off")
    ap.add_argument("--prefill-batch", type=int, default=None)
    ap.add_argument("--trace", action="store_true", help="also one prefill per row under the profiler")
    ap.add_argument(
        "--trace-decode", action="store_true", help="also the decode step per row, from two profiled calls"
    )
    ap.add_argument("--tiny", action="store_true", help="tiny-next-cpu on the CPU, 4 new tokens")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batch.split(",")]
    steps = a.step.split(",")
    if any(b < 1 for b in batches) or any(st not in STEPS for st in steps):
        ap.error(f"--batch takes positive integers, --step names from {', '.join(STEPS)}")
    if a.tiny:
        a.device, a.shape, a.new_tokens, a.reps = "cpu", "tiny-next-cpu", 4, 1
        batches = [min(b, 4) for b in batches]
        torch.set_num_threads(2)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(a.shape, a.device, dtype)
    model.generation_config.eos_token_id = None
    one, _ = bench_inputs(model, 1, 35, 29, a.device, dtype)
    res = dict(
        command="python -m evals.kv_serving_phases " + shlex.join(sys.argv[1:] if argv is None else argv),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        shape=a.shape,
        batches=batches,
        method=a.method,
        compile=a.compile,
        prefill_batch=a.prefill_batch,
        new_tokens=a.new_tokens,
        env=environment(),
        rows=[],
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ph = Phases(device)
    classes = [fdec.FastDecoder, fast.WindowDecoder, fast_quant.QuantDecoder, fast_sparse.SparseDecoder]
    saved = dict(prefill=fgen.prefill, capture=fdec.capture_graph)
    saved |= {(c, n): c.__dict__[n] for c in classes for n in ("fill", "run") if n in c.__dict__}
    fgen.prefill = ph.wrap(saved["prefill"], "prefill")
    fdec.capture_graph = ph.wrap(saved["capture"], "capture")
    for (c, n), fn in list(saved.items())[2:]:
        setattr(c, n, ph.wrap(fn, "fill" if n == "fill" else "decode"))
    try:
        runs = [(m, b, st) for m in kv_modes(a.kv) for b in batches for st in steps]
        for (name, kv), batch, step in runs:
            inputs = {k: v.repeat(batch, *[1] * (v.dim() - 1)) for k, v in one.items()}
            clear(model)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            wrapped = kv is not None or a.method != "none"
            if wrapped:
                extra = {} if a.method == "none" else {"prune": a.method, "budget": a.budget}
                mmsink.wrap(model, kv=kv, **extra)
            # every call of the row: the timed ones and the traced ones alike
            generate = functools.partial(
                mmsink.generate_fast,
                model,
                compile=None if a.compile == "auto" else False,
                step=STEPS[step],
                prefill_batch=a.prefill_batch,
                **inputs,
            )
            try:
                calls = []
                with torch.no_grad():
                    warm = 2 if a.compile == "auto" else 1
                    for _ in range(warm + a.reps):
                        ph.now = {}
                        synced(device)
                        t0 = time.perf_counter()
                        generate(max_new_tokens=a.new_tokens)
                        synced(device)
                        calls.append(dict(ph.now, total=time.perf_counter() - t0))
                    with ph.quiet():  # no syncs of the phases' timing inside the traced calls
                        if a.trace:  # (the model still wrapped: the row's own prefill)
                            trace = traced(functools.partial(generate, max_new_tokens=1), device)
                            if wrapped and a.method != "none":  # what the traced prefill kept
                                trace["mean_kept"] = mmsink.stats(model).mean_kept
                        if a.trace_decode:
                            ends = (
                                traced(functools.partial(generate, max_new_tokens=k), device)
                                for k in (1, a.new_tokens)
                            )
                            step_trace = per_step(*ends, a.new_tokens - 1)
            finally:
                if wrapped:
                    mmsink.unwrap(model)
            timed = calls[warm:]
            row = dict(kv=name, batch=batch, step=step, first_call=calls[0])
            if a.trace:
                row["trace"] = trace
            if a.trace_decode:
                row["trace_decode"] = step_trace
            for k in ("total", "prefill", "fill", "capture", "decode"):
                row[k] = statistics.median(c.get(k, 0.0) for c in timed)
            row["ms_per_step"] = 1e3 * row["decode"] / max(a.new_tokens - 1, 1)
            row["peak_gib"] = (
                torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            )
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            write(out, res)
    finally:
        fgen.prefill, fdec.capture_graph = saved["prefill"], saved["capture"]
        for (c, n), fn in list(saved.items())[2:]:
            setattr(c, n, fn)
    print((out / "kv_serving_phases.md").read_text())


def traced(fn, device, least_us: float = 50.0, top: int = 12) -> dict:
    """``fn`` once under the torch profiler (after a warm call): ``ttft_breakdown.call_summary``'s wall,
    kernel time by kind, GPU busy / idle and idle gaps of ``least_us`` or more (the ``top`` longest kept),
    plus the ``top`` kernels by summed time."""
    from torch.profiler import record_function

    from .ttft_breakdown import CALL, GPU_WORK, call_summary, profiled

    gpu = device.type == "cuda"
    fn()

    def run():
        with record_function(CALL):
            fn()
            synced(device)

    events = profiled([run], gpu, lambda: synced(device))
    call = next(e for e in events if e["name"] == CALL)
    out = call_summary(call, events, gpu, least_us)
    out["gaps"] = sorted(out["gaps"], key=lambda g: -g["us"])[:top]
    t0, t1 = call["ts"], call["ts"] + call["dur"]
    names = collections.Counter()
    for e in events:
        if e.get("cat") in GPU_WORK and t0 <= e["ts"] < t1:
            names[e["name"][:90]] += e["dur"] / 1e3
    out["top_kernels_ms"] = {k: round(v, 3) for k, v in names.most_common(top)}
    out["kernels_ms"] = dict(names)  # every kernel name's total (``per_step`` takes differences)
    return out


def per_step(one: dict, many: dict, steps: int, top: int = 12) -> dict:
    """The decode step from two ``traced`` calls, of 1 new token (``one``) and of ``steps`` + 1 (``many``):
    their difference per step in wall, GPU busy and kernel time by kind and by name (``top`` kept)."""
    if steps < 1:
        raise ValueError("mmsink: --trace-decode needs --new-tokens >= 2")

    def diff(a, b):  # None where the profile has no such number (no GPU)
        return None if a is None or b is None else round((b - a) / steps, 4)

    names = {k: diff(one["kernels_ms"].get(k, 0.0), v) for k, v in many["kernels_ms"].items()}
    kinds = {k: diff((one["kinds"] or {}).get(k, 0.0), v) for k, v in (many["kinds"] or {}).items()}
    return dict(
        steps=steps,
        wall_ms=diff(one["wall_ms"], many["wall_ms"]),
        gpu_busy_ms=diff(one["gpu_busy_ms"], many["gpu_busy_ms"]),
        kernels=diff(one["kernels"], many["kernels"]),
        kinds=kinds,
        top_kernels_ms=dict(sorted(names.items(), key=lambda kv: -kv[1])[:top]),
    )


def write(out: Path, res: dict) -> None:
    (out / "kv_serving_phases.json").write_text(json.dumps(res, indent=1))
    lines = [
        f"`{res['command']}`",
        "",
        f"{res['device']}, {res['shape']}, method {res['method']}, {res['new_tokens']} new tokens, "
        f"compile {res['compile']}, prefill_batch {res['prefill_batch']}; torch {res['env']['torch']}, "
        f"transformers {res['env']['transformers']}",
        "",
        "| kv | batch | step | s per call | prefill s | fill s | decode s | ms / step "
        "| first call s (capture s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        f = r["first_call"]
        lines.append(
            f"| {r['kv']} | {r['batch']} | {r['step']} "
            f"| {r['total']:.2f} | {r['prefill']:.2f} | {r['fill']:.3f} | {r['decode']:.2f} | "
            f"{r['ms_per_step']:.1f} | {f['total']:.2f} ({f.get('capture', 0.0):.2f}) |"
        )
    for r in res["rows"]:
        t = r.get("trace")
        if not t:
            continue
        lines += [
            "",
            f"**Prefill under the profiler** (kv {r['kv']}, batch {r['batch']}, step {r['step']}): wall "
            f"{t['wall_ms']} ms, kernels {t['kernel_ms']} ms ({t['kernels']}), GPU busy "
            f"{t['gpu_busy_ms']} ms, idle {t['gpu_idle_ms']} ms; by kind {t['kinds']}",
        ]
        lines += kernel_table(t["top_kernels_ms"], "ms")
        lines += ["", "| idle gap at ms | us | host then |", "|---|---|---|"]
        lines += [f"| {g['start_ms']} | {g['us']} | {g['host'][:100]} |" for g in t["gaps"]]
    for r in res["rows"]:
        t = r.get("trace_decode")
        if not t:
            continue
        lines += [
            "",
            f"**One decode step under the profiler** (kv {r['kv']}, batch {r['batch']}, step {r['step']}; "
            f"a call of {t['steps'] + 1} new tokens minus one of 1, per step): wall {t['wall_ms']} ms, "
            f"GPU busy {t['gpu_busy_ms']} ms, {t['kernels']} kernels; by kind {t['kinds']}",
        ]
        lines += kernel_table(t["top_kernels_ms"], "ms per step")
    (out / "kv_serving_phases.md").write_text("\n".join(lines) + "\n")


def kernel_table(kernels: dict, unit: str) -> list:
    """Markdown lines: a blank one, then a table of the kernels' times (``unit``), in their order."""
    return ["", f"| kernel | {unit} |", "|---|---|", *(f"| `{k}` | {v} |" for k, v in kernels.items())]


if __name__ == "__main__":
    main()
