"""Where does a batch-1 prefill spend its time? Host (launches, syncs) against device (kernels).

    python evals/profile_prefill.py --shape llava-1.5-7b --methods none,fastv:64,pdrop:64 --out DIR

Per configuration: wall time, summed kernel time, kernel count, host-device syncs (with the first
source lines that caused them) and the top host-side operators. A prefill whose wall time is far above
its kernel time is launch-bound: the fix is fewer launches / no syncs, not fewer tokens.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import warnings

import torch

from mmsink.bench import SHAPES, bench_inputs, build, timed


def syncs(fn) -> list[str]:
    """Source lines (outside torch) that forced a host-device sync while ``fn`` ran."""
    found = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
        for w in caught:
            if "synchroniz" not in str(w.message):
                continue
            found.append(f"{w.filename}:{w.lineno}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return found


def profile(fn) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events)
    launch_ops = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel")
    launches = sum(e.count for e in events if e.key in launch_ops)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return dict(
        kernel_ms=kernel_us / 1e3,
        launches=launches,
        top_host=[(e.key, e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in top],
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llava-1.5-7b", choices=sorted(SHAPES))
    ap.add_argument("--methods", default="none,fastv:64,pdrop:64,dart:64")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import mmsink

    dev, dt = "cuda", torch.bfloat16
    model = build(a.shape, dev, dt)
    inputs, _ = bench_inputs(model, a.batch, 35, 29, dev, dt, grid=SHAPES[a.shape].get("grid"))

    def prefill():
        with torch.no_grad():
            return model(**inputs, logits_to_keep=1, use_cache=True)

    rows = []
    for spec in ["plain"] + a.methods.split(","):
        if spec == "plain":
            mmsink.unwrap(model)
        else:
            m, _, b = spec.partition(":")
            mmsink.wrap(model, prune=None if m == "none" else m, budget=int(b) if b else None)
        ms = timed(prefill, 5, torch.cuda.synchronize) * 1e3
        s = syncs(prefill)
        p = profile(prefill)
        sites = sorted(collections.Counter(s).items())
        row = dict(config=spec, wall_ms=ms, syncs=len(s), sync_sites=sites, **p)
        rows.append(row)
        k, n = p["kernel_ms"], p["launches"]
        print(f"{spec:12s} wall {ms:7.1f} ms  kernels {k:7.1f} ms  launches {n:5d}  syncs {len(s)}")
        for site, n in row["sync_sites"][:8]:
            print(f"    sync x{n}: {site}")
        for k, n, t in p["top_host"][:6]:
            print(f"    host {t:7.2f} ms  x{n:4d}  {k}")
    mmsink.unwrap(model)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"profile_{a.shape}_b{a.batch}.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
