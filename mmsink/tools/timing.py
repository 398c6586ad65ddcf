"""What the kernel probes in evals/ share (decode_kernel_speed, gemv_speed, received_speed,
lse_attention_speed): device time per call of a function, as a CUDA graph replay or eagerly, and a
probe's start (device, output folder, results header)."""

from __future__ import annotations

import statistics
import time

import torch


def timer(fn, dev, inner: int = 1, graph: bool = True, warm: int = 3):
    """A callable returning microseconds per ``fn()``: CUDA events around ``inner`` calls, replayed as one
    CUDA graph (``graph``) or run eagerly; wall clock on the CPU. ``warm`` calls run first on a side stream
    (Triton's compile, cuBLAS's workspace and cuDNN's plan happen there, not inside the capture)."""
    if torch.device(dev).type != "cuda":

        def run_cpu():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - t0) * 1e6 / inner

        return run_cpu
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    replay = None
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
        replay = g.replay
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run():
        a.record()
        if replay is not None:
            replay()
        else:
            for _ in range(inner):
                fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) * 1e3 / inner

    return run


def alternated(variants: dict, dev, reps: int, per: int = 1) -> dict:
    """Median microseconds of each of ``variants`` (name: a function of no arguments) over ``reps``
    rounds, one call of each per round in turn (so drift hits all alike), as CUDA graph replays; each
    call's time divided by ``per`` (a variant that runs ``per`` calls of the thing timed)."""
    runs = {key: timer(fn, dev) for key, fn in variants.items()}
    times = {key: [] for key in runs}
    for _ in range(reps):
        for key, run in runs.items():
            times[key].append(run() / per)
    return {key: statistics.median(v) for key, v in times.items()}


def probe_start(name: str, args, available, argv=None, **meta):
    """(device, output folder, results dict) of a kernel probe run as ``evals/<name>.py``: CUDA, or the CPU
    with ``args.tiny`` (the code path); a one-line exit where CUDA or the kernel (``available(device)``)
    is missing. The folder ``args.out`` is made; the dict holds the command, machine, torch and ``meta``,
    and an empty ``shapes`` list for the probe's rows."""
    import sys
    from pathlib import Path

    dev = "cpu" if args.tiny else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{name}: needs CUDA (or --tiny)")
    if not args.tiny and not available(dev):
        sys.exit(f"{name}: Triton is not available (or the kernel's switch is 0)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = sys.argv if argv is None else [f"evals/{name}.py", *argv]
    machine = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    res = dict(command="python " + " ".join(command), machine=machine, torch=torch.__version__, **meta)
    return dev, out, {**res, "shapes": []}
