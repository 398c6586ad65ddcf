"""Where does a batch-1 prefill spend its time? Host (launches, syncs) against device (kernels).

    python evals/profile_prefill.py --shape llava-1.5-7b --methods none,fastv:64,pdrop:64 --out DIR
    python evals/profile_prefill.py --shape llava-1.5-7b --methods var:3 --out DIR   # VAR, tau 3

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

from mmsink.tools.bench import SHAPES, bench_inputs, build, timed


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
    if not torch.cuda.is_available():  # no kernels to time: the calls alone
        return dict(kernel_ms=0.0, launches=0, top_host=[], device_ops=cpu_calls(fn))
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with tprofile(activities=acts) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only (operator rows also carry their kernels' device time: summing both counts twice)
    kernel_us = sum(e.self_device_time_total for e in events if str(e.device_type).endswith("CUDA"))
    launch_ops = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel")
    launches = sum(e.count for e in events if e.key in launch_ops)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    # device time by aten operator (its kernels included): where the GPU spends a prefill
    ops = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.key.startswith("aten::") and e.device_time_total > 0:
            ops[e.key][0] += e.count
            ops[e.key][1] += e.self_device_time_total / 1e3
    return dict(
        kernel_ms=kernel_us / 1e3,
        launches=launches,
        top_host=[(e.key, e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in top],
        device_ops={k: (n, round(t, 3)) for k, (n, t) in ops.items()},
    )


def cpu_reads(fn) -> list[str]:
    """On a CPU: the source lines in mmsink that read a device value (on a GPU, host syncs)."""
    from mmsink.tools.reads import DeviceReads

    with DeviceReads() as r:
        fn()
    return [site for site, n in r.sites.items() if "/mmsink/" in site for _ in range(n)]


def counter():
    try:
        from .selection_ops import Ops
    except ImportError:  # run as a script: this folder is on the path
        from selection_ops import Ops
    return Ops()


STAND_IN = None  # ``--graphs``: the op counter whose stand-in capture the pruners' graphs use


def stand_in_graphs() -> None:
    """On a CPU, the pruners' ``core.graphs.Graphed`` loops as on a GPU (evals/selection_ops.py --graphs):
    captured once, then a replay whose ops are not counted, as a GPU profile does not see a graph's."""
    global STAND_IN
    from mmsink.core import graphs

    STAND_IN = counter()
    graphs.is_cuda, graphs.capture = (lambda t: True), STAND_IN.stand_in()


def cpu_calls(fn) -> dict:
    """On a CPU (no kernels to time): {aten operator: [calls, 0.0]} other than views, after decomposition
    (``evals.selection_ops.Ops``: roughly the kernels a GPU would launch), named as the profiler does."""
    ops = STAND_IN or counter()
    ops.ops.clear()
    with ops:
        fn()
    calls = collections.defaultdict(lambda: [0, 0.0])
    for name, n in ops.ops.items():  # (a stood-in graph's replay counts as "graph launch")
        calls["aten::" + name.split(".")[1] if name.startswith("aten.") else name][0] += n
    return dict(calls)


def diff_ops(a: dict, b: dict, n: int = 10, by_calls: bool = False) -> list:
    """Operators whose device time (``by_calls``: call count) differs most between two profiles (a - b):
    what a method adds."""
    keys = set(a) | set(b)
    d = [
        (k, a.get(k, (0, 0.0))[0] - b.get(k, (0, 0.0))[0], a.get(k, (0, 0.0))[1] - b.get(k, (0, 0.0))[1])
        for k in keys
    ]
    return sorted(d, key=lambda r: (-abs(r[1]), r[0]) if by_calls else -abs(r[2]))[:n]


def decode_breakdown(model, inputs) -> dict:
    """generate_fast's per-token cost (slope over lengths; decoders reused, so capture and compile are
    paid by the warm-up call) and one replayed decode step alone, with and without torch.compile."""
    import mmsink

    sync = torch.cuda.synchronize
    r = {"config": "generate_fast"}
    for comp in (False, True):
        tag = "compiled" if comp else "eager"
        for n in (1, 17, 65):
            run = lambda n=n, c=comp: mmsink.generate_fast(model, max_new_tokens=n, compile=c, **inputs)  # noqa: E731
            r[f"{tag}_{n}_ms"] = timed(run, 3, sync) * 1e3
        dec = next(reversed(model.__dict__["_mmsink_decoders"].values()))  # the one the 65-token run used

        def replay(dec=dec):
            dec.t.zero_()
            dec.graph()

        r[f"{tag}_replay_ms"] = timed(replay, 20, sync) * 1e3
        r[f"{tag}_per_token_ms"] = per = (r[f"{tag}_65_ms"] - r[f"{tag}_17_ms"]) / 48
        print(
            f"generate_fast {tag}: {per:.2f} ms/token (slope 17->65), replay {r[tag + '_replay_ms']:.2f} ms,"
            f" prefill+64 {r[tag + '_65_ms']:.1f} ms, prefill+1 {r[tag + '_1_ms']:.1f} ms"
        )
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llava-1.5-7b", choices=sorted(SHAPES))
    ap.add_argument("--methods", default="none,fastv:64,pdrop:64,dart:64")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--device",
        default="cuda",
        help="cpu: no device times, aten calls per operator (--shape selection-ops: LLaVA's token counts)",
    )
    ap.add_argument(
        "--graphs", action="store_true", help="cpu: selection loops (core.graphs.Graphed) graphed as on a GPU"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--decode", action="store_true", help="also break down generate_fast's time")
    ap.add_argument(
        "--ideal", action="store_true", help="also profile each method's plan replayed (prune='replay')"
    )
    a = ap.parse_args()
    import mmsink

    dev, dt = a.device, (torch.bfloat16 if a.device == "cuda" else torch.float32)
    if a.graphs and dev == "cpu":
        stand_in_graphs()
    sync = torch.cuda.synchronize if dev == "cuda" else None
    model = build(a.shape, dev, dt)
    model.generation_config.eos_token_id = None  # random weights: fixed lengths
    inputs, _ = bench_inputs(model, a.batch, 35, 29, dev, dt, grid=SHAPES[a.shape].get("grid"))

    def prefill():
        with torch.no_grad():
            return model(**inputs, logits_to_keep=1, use_cache=True)

    rows = []
    for spec in ["plain"] + a.methods.split(",") + ["plain"]:
        if spec == "plain":
            if getattr(model, "_mmsink", None) is not None:
                mmsink.unwrap(model)
        else:
            m, _, b = spec.partition(":")
            if m == "var":  # VAR as the bench adds it (sink channels 1415 / 2533, tau after the colon)
                hidden = model.config.get_text_config().hidden_size
                dims = tuple(d % hidden for d in (1415, 2533))
                mmsink.wrap(model, prune=None, var={"sink_dims": dims, "tau": float(b) if b else 3.0})
            else:
                mmsink.wrap(model, prune=None if m == "none" else m, budget=int(b) if b else None)
        reps = 5 if dev == "cuda" else 1  # a CPU run counts calls: its times are no measure
        ms = timed(prefill, reps, sync) * 1e3
        s = syncs(prefill) if dev == "cuda" else cpu_reads(prefill)
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
        top = sorted(p["device_ops"].items(), key=lambda r: (-r[1][1], -r[1][0]))[:8]
        for k, (n, t) in top:
            print(f"    device {t:7.2f} ms  x{n:4d}  {k}")
        if a.ideal and spec != "plain":
            plan = mmsink.stats(model).kept_indices
            mmsink.unwrap(model)
            mmsink.wrap(model, prune="replay", plan=plan)
            ms_i = timed(prefill, reps, sync) * 1e3
            q = profile(prefill)
            row["ideal"] = dict(wall_ms=ms_i, kernel_ms=q["kernel_ms"], launches=q["launches"])
            row["minus_ideal"] = diff_ops(p["device_ops"], q["device_ops"], 14, by_calls=dev == "cpu")
            calls = [sum(n for n, _ in r["device_ops"].values()) for r in (p, q)]
            row["ideal"]["aten_calls"], row["aten_calls"] = calls[1], calls[0]
            print(
                f"  ideal      wall {ms_i:7.1f} ms  kernels {q['kernel_ms']:7.1f} ms  "
                f"launches {q['launches']:5d}  aten calls {calls[0]} (method) - {calls[1]} (ideal)"
                f" = {calls[0] - calls[1]:+d}"
            )
            for k, n, t in row["minus_ideal"]:
                print(f"    +device {t:7.2f} ms  {n:+5d} calls  {k}")
            mmsink.unwrap(model)
    if a.decode:
        rows.append(decode_breakdown(model, inputs))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"profile_{a.shape}_b{a.batch}.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
