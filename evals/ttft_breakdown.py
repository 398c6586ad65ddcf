"""Where does generate_fast's time to first token go? Stage by stage, batch 1.

    python evals/ttft_breakdown.py --shape llava-next-7b --methods none,fastv:320,visionzip:320 --ideal
    python evals/ttft_breakdown.py --count --shape tiny-next-cpu --out evals/results/fast_path/next_host_ops

Timed mode also times, alternated rep by rep, each config with the graphed tower launched before the
forward (``generate_fast``'s default) and called in the forward (``tower_first=False``), with
``--ideal`` each method's plan replayed with no selection work (``prune='replay'``), and with
``--plain-step`` through the plain step (``step={}``: the hand-off's layers without the fused step).

Hooks on the model's own modules mark the end of each stage: up to the tower's launch (the GPU idles
until then), from the launch to the tower's call, the tower, the
projector (a vision-stage pruner selects in its pre-hook), LLaVA-NeXT's merge (unpad, newline tokens,
packing: the end of ``get_image_features``), the features placed in the embeddings (the language model's
start), the plan set up (rotary tables, mask, the first layer's plan), layers run eagerly before the
hand-off (with the pruner's selection), the graphed tail, and what follows to the token.

Timed (GPU): each mark stamps the clock after a device sync (a stage's time is its host work plus its
kernels, no overlap between stages), except the tower's launch: stamped without a sync, so the first stage
is the host's work alone (the GPU idle) and the tower's kernels fall in the next one, overlapped with the
host's prologue. The synced run is slower than a plain one; both totals are printed.

``--count`` (CPU): per stage, the aten operators dispatched (each a kernel launch or a view: host work on
a GPU) and the syncs a GPU run would make: reads of values computed from the weights or the device inputs
(reads of tensors a GPU run keeps on the host are listed apart), and tensors built from host data for a
named device (a blocking copy). The tower and the tail run through the same graph wrappers as on a GPU
with a replay stand-in; what runs inside a replay is counted apart (one graph launch on a GPU).

``--trace``: when is the GPU idle in a steady-state call, and what is the host doing then? After the
timed mode's warm-up, ``--calls`` calls per config under ``torch.profiler`` (CPU + CUDA), each stage in a
``record_function`` range (marked without syncs): per call averaged, the wall time, the kernel time by
kind (GEMM / GEMV, attention, copies, other), the GPU's busy time (the union of its kernels' spans) and
idle time; per stage the host, busy and idle time; the idle gaps of ``--gap-us`` or more, each with the
stage and the host's work then (a record_function label, else the outermost aten ops, else CUDA runtime
calls). On the CPU: the host's times alone.

    python evals/ttft_breakdown.py --trace --methods none,visionzip:320,fastv:320 --out DIR
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

import mmsink
from mmsink.core import layout
from mmsink.fast import decode as fastmod
from mmsink.fast import store, vision_graph
from mmsink.tools.bench import SHAPES, bench_inputs, build
from mmsink.tools.reads import is_read, site

STAGES = [
    ("start", "to the tower's launch (GPU idle)"),
    ("before_tower", "launched: to the tower's call"),
    ("tower", "vision tower (graph)"),
    ("projector", "projector (+ vision-stage selection)"),
    ("merge", "NeXT merge (unpad, newline, pack)"),
    ("placement", "features placed in the embeddings"),
    ("plan", "plan set up (rotary, mask, first layer's plan)"),
    ("eager_layers", "layers before the hand-off (eager, with selection)"),
    ("tail", "layers after the hand-off (graph)"),
    ("after", "to the token"),
]
NAMES = dict(STAGES)


@contextlib.contextmanager
def staged(model, mark):
    """Inside the block, ``mark(then)`` is called where a stage of a prefill ends and stage ``then`` begins
    (keys of STAGES; a prefill starts in "start", which lasts to the tower's call when the tower is not
    launched first)."""
    inner = model.model

    def at(then):
        return lambda *_: mark(then)

    hooks = [
        inner.vision_tower.register_forward_pre_hook(at("tower")),
        inner.vision_tower.register_forward_hook(at("projector")),
        inner.multi_modal_projector.register_forward_hook(at("merge")),
        inner.language_model.register_forward_pre_hook(at("plan")),
        # after mmsink's own pre-hook (registered first); not reached when it hands off at layer 0
        inner.language_model.layers[0].register_forward_pre_hook(at("eager_layers")),
    ]
    features = inner.get_image_features

    def get_image_features(*a, **k):
        out = features(*a, **k)
        mark("placement")
        return out

    real, launch = fastmod.FastDecoder.run_tail, getattr(vision_graph.GraphedTower, "launch", None)

    def run_tail(self, first, *a, **k):
        mark("tail")
        out = real(self, first, *a, **k)
        mark("after")
        return out

    def launched(self, *a, **k):
        out = launch(self, *a, **k)
        mark("before_tower", wait=False)  # the host's work to here; the tower's kernels go to the next stage
        return out

    inner.get_image_features = get_image_features
    fastmod.FastDecoder.run_tail = run_tail
    if launch is not None:  # (a tree from before the launch: --count of the "before" column)
        vision_graph.GraphedTower.launch = launched
    try:
        yield
    finally:
        fastmod.FastDecoder.run_tail = real
        if launch is not None:
            vision_graph.GraphedTower.launch = launch
        del inner.get_image_features
        for h in hooks:
            h.remove()


def stamps(model, fn, sync=torch.cuda.synchronize) -> list:
    marks, now = [], ["start"]

    def mark(then, wait=True):
        if wait:
            sync()
        marks.append((now[0], time.perf_counter()))
        now[0] = then

    with staged(model, mark):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        end = time.perf_counter()
    rows, prev = [], t0
    for name, t in marks + [(now[0], end)]:
        rows.append((NAMES[name], (t - prev) * 1e3))
        prev = t
    return rows


def alternated(fns: dict, reps: int, sync) -> dict:
    """Median seconds of each of ``fns``, run in turn rep by rep (a shared host drifts between runs)."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def timed_main(a):
    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build(a.shape, a.device, dtype)
    model.generation_config.eos_token_id = None
    inputs, _ = bench_inputs(model, 1, 35, 29, a.device, dtype, grid=SHAPES[a.shape].get("grid"))
    first = lambda: mmsink.generate_fast(model, max_new_tokens=1, graphs=cuda, **inputs)  # noqa: E731

    def late():  # the tower called in the forward, as before the launch existed
        mmsink.generate_fast(model, max_new_tokens=1, graphs=cuda, tower_first=False, **inputs)

    out = []
    for spec in a.methods.split(","):
        m, _, b = spec.partition(":")
        mmsink.wrap(model, prune=m, budget=int(b) if b else None)
        runs = {"tower first": first, "tower in the forward": late}
        if a.plain_step:  # the hand-off's layers through the plain step (the fused one is the GPU's default)
            runs["plain step"] = lambda: mmsink.generate_fast(
                model, max_new_tokens=1, graphs=cuda, step={}, **inputs
            )
        for fn in runs.values():
            fn()
            fn()  # the tail's graph is captured the second time
        if a.ideal and m != "none":  # the method's plan replayed: no selection work (the bench's ideal)
            plan = mmsink.stats(model).kept_indices
            mmsink.wrap(model, prune="replay", plan=plan)
            first()
            first()
            ideal = alternated({"ideal": first}, a.reps, sync)["ideal"] * 1e3
            mmsink.wrap(model, prune=m, budget=int(b) if b else None)
            first()
        ms = {k: v * 1e3 for k, v in alternated(runs, a.reps, sync).items()}
        stamps(model, first, sync)  # twice: the second is reported
        rows = stamps(model, first, sync)
        total = sum(t for _, t in rows)
        line = ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
        if a.ideal and m != "none":
            line += f", its plan replayed (ideal) {ideal:.1f} ms"
            ms["ideal"] = ideal
        print(f"{spec}: TTFT {line} (synced stages: {total:.1f} ms)")
        for name, t in rows:
            print(f"    {t:7.2f} ms  {name}")
        out.append(dict(config=spec, ttft_ms=ms, stages=rows))
    mmsink.unwrap(model)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"ttft_breakdown_{a.shape}.json"), "w") as f:
            json.dump(dict(command=" ".join(["python", *sys.argv]), results=out), f, indent=1)


# ---------------------------------------------------------------------------------------- --trace
CALL = "ttft_breakdown call"  # record_function ranges the trace carries: each profiled call, its stages
STAGE = "ttft_breakdown stage: "
GPU_WORK = {"kernel", "gpu_memcpy", "gpu_memset"}  # chrome-trace categories of GPU activity
# a kernel's kind by name, first match wins: flash kernels name cutlass types, cuDNN's SDPA says sdpa and
# its convolutions gemm
KINDS = (
    ("attention", ("flash", "fmha", "attn", "sdpa")),
    ("gemm", ("nvjet", "cutlass", "gemm", "gemv", "sm90")),
    ("attention", ("cudnn",)),
    ("copies", ("copy", "memcpy", "memset")),
)
KIND_NAMES = ("gemm", "attention", "copies", "other")


def kind(name: str) -> str:
    n = name.lower()
    return next((k for k, words in KINDS if any(w in n for w in words)), "other")


def union(spans) -> list:
    """Sorted disjoint (start, end) spans covering the points of ``spans`` (overlapping, nested or touching
    ones merge: kernels of several streams count once)."""
    out = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def covered(spans, start, end) -> float:
    """Length of [start, end] inside ``spans`` (disjoint)."""
    return sum(max(0.0, min(end, e) - max(start, s)) for s, e in spans)


def gaps(spans, start, end, least) -> list:
    """The spans of [start, end] outside ``spans`` (disjoint, sorted) of length ``least`` or more."""
    out, t = [], start
    for s, e in spans:
        if s >= end:
            break
        if s - t >= least:
            out.append((t, s))
        t = max(t, e)
    if end - t >= least:
        out.append((t, end))
    return out


def outermost(events) -> list:
    """The events of one thread not inside another (by start, the longer first)."""
    out, end = [], float("-inf")
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= end:
            out.append(e)
            end = e["ts"] + e["dur"]
    return out


def overlapping(events, start, end) -> list:
    return [x for x in events if x["ts"] < end and x["ts"] + x["dur"] > start]


def firsts(names, n=3) -> list:
    return list(dict.fromkeys(names))[:n]


def call_summary(call, events, gpu: bool, least: float) -> dict:
    """One profiled call (its ``CALL`` range) from the chrome trace's ``events``: wall, kernel time by kind,
    GPU busy (kernel spans' union) and idle time; per stage (its ``STAGE`` ranges) host, busy and idle ms;
    the idle gaps of ``least`` us or more, each with the host's work then: the outermost record_function
    label (the script's own left out) if any, else the outermost aten ops, else CUDA runtime calls (a graph's
    launch, a sync), else Python; ``host_in_ops``: the part of the gap the host spent in aten ops."""
    t0, t1 = call["ts"], call["ts"] + call["dur"]
    mine = [e for e in events if e.get("tid") == call["tid"] and e.get("pid") == call["pid"]]
    inside = [e for e in mine if t0 <= e["ts"] < t1]
    notes = [e for e in inside if e.get("cat") == "user_annotation"]
    stages = [e for e in notes if e["name"].startswith(STAGE)]
    labels = outermost(e for e in notes if not e["name"].startswith((STAGE, CALL)))
    ops = outermost(e for e in inside if e.get("cat") == "cpu_op")
    runtime = [e for e in inside if e.get("cat") in ("cuda_runtime", "cuda_driver")]  # outside ops: launches
    in_ops = union((e["ts"], e["ts"] + e["dur"]) for e in ops)
    work = [e for e in events if e.get("cat") in GPU_WORK and t0 <= e["ts"] < t1] if gpu else []
    busy = union((e["ts"], min(t1, e["ts"] + e["dur"])) for e in work)
    ms = lambda us: round(us / 1e3, 4) if gpu else None  # noqa: E731
    rows = {}
    for e in stages:  # a stage entered twice sums
        key = e["name"].removeprefix(STAGE)
        r = rows.setdefault(key, dict(stage=key, name=NAMES.get(key, key), host=0.0, busy=0.0))
        r["host"] += e["dur"]
        r["busy"] += covered(busy, e["ts"], e["ts"] + e["dur"])
    stage_rows = [
        dict(stage=r["stage"], name=r["name"], host_ms=round(r["host"] / 1e3, 4), gpu_busy_ms=ms(r["busy"]),
             gpu_idle_ms=ms(r["host"] - r["busy"]))
        for r in rows.values()
    ]  # fmt: skip
    kinds = dict.fromkeys(KIND_NAMES, 0.0)
    for e in work:
        kinds[kind(e["name"])] += e["dur"]
    idle_gaps = []
    for s, e in gaps(busy, t0, t1, least) if gpu else []:
        label = firsts(x["name"] for x in overlapping(labels, s, e))
        names = firsts(x["name"] for x in overlapping(ops, s, e))
        calls = firsts(x["name"] for x in overlapping(runtime, s, e))
        idle_gaps.append(
            dict(
                start_ms=round((s - t0) / 1e3, 4),
                us=round(e - s, 2),
                stages=firsts((x["name"].removeprefix(STAGE) for x in overlapping(stages, s, e)), 99),
                label=label,
                ops=names,
                runtime=calls,
                host=" / ".join(label or names or calls) or "Python (no op)",
                host_in_ops_us=round(covered(in_ops, s, e), 2),
            )
        )
    span = sum(e - s for s, e in busy)
    return dict(
        wall_ms=round(call["dur"] / 1e3, 4),
        kernel_ms=ms(sum(e["dur"] for e in work)),
        kernels=len(work) if gpu else None,
        # replays, whose kernels should be among the call's (the profiler is set up before any capture)
        graph_launches=sum(e.get("cat") == "cuda_runtime" and "GraphLaunch" in e["name"] for e in inside)
        if gpu
        else None,
        gpu_busy_ms=ms(span),
        gpu_idle_ms=ms(call["dur"] - span),
        kinds={k: ms(v) for k, v in kinds.items()} if gpu else None,
        stages=stage_rows,
        gaps=idle_gaps,
        gap_ms=ms(sum(g["us"] for g in idle_gaps)),
    )


TOTALS = ("wall_ms", "kernel_ms", "kernels", "graph_launches", "gpu_busy_ms", "gpu_idle_ms", "gap_ms")


def mean_of(calls: list) -> dict:
    """The calls' numbers averaged (stages by key, in order of appearance); the gaps: those of the call of
    median wall time (gaps averaged over calls would mix different gaps)."""
    avg = lambda vals: None if None in vals else round(statistics.fmean(vals), 4)  # noqa: E731
    out = {k: avg([c[k] for c in calls]) for k in TOTALS}
    out["kinds"] = (
        None if calls[0]["kinds"] is None else {k: avg([c["kinds"][k] for c in calls]) for k in KIND_NAMES}
    )
    keys = list(dict.fromkeys(r["stage"] for c in calls for r in c["stages"]))
    out["stages"] = []
    for key in keys:
        got = [next((r for r in c["stages"] if r["stage"] == key), None) for c in calls]
        row = dict(stage=key, name=NAMES.get(key, key))
        for f in ("host_ms", "gpu_busy_ms", "gpu_idle_ms"):
            row[f] = avg([0.0 if r is None else r[f] for r in got])
        out["stages"].append(row)
    median = sorted(calls, key=lambda c: c["wall_ms"])[len(calls) // 2]
    out["gaps"], out["n_gaps"] = median["gaps"], avg([len(c["gaps"]) for c in calls])
    return out


def profiled(fns: list, cuda: bool, sync) -> list:
    """The chrome trace's events of ``fns`` run under the profiler, one after another."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for fn in fns:
            sync()
            fn()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(os.path.join(d, "trace.json"))
        with open(os.path.join(d, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X"]


def traced_call(model, fn, sync):
    """``fn`` in a ``CALL`` range, each stage (``staged``'s marks, no syncs added) in a ``STAGE`` range; the
    last one closes after the call's closing sync (the hooks are set outside the call's range)."""
    from torch.profiler import record_function

    now = [None]

    def mark(then, wait=True):
        now[0].__exit__(None, None, None)
        now[0] = record_function(STAGE + then).__enter__()

    def run():
        with staged(model, mark), record_function(CALL):
            now[0] = record_function(STAGE + STAGES[0][0]).__enter__()
            try:
                fn()
                sync()
            finally:
                now[0].__exit__(None, None, None)

    return run


def trace_main(a):
    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:  # the profiler's setup before any graph capture (as evals/profile_decode.py)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]):
            pass
    model = build(a.shape, a.device, dtype)
    model.generation_config.eos_token_id = None
    inputs, n_vis = bench_inputs(model, 1, 35, 29, a.device, dtype, grid=SHAPES[a.shape].get("grid"))
    first = lambda: mmsink.generate_fast(model, max_new_tokens=1, graphs=cuda, **inputs)  # noqa: E731
    meta = dict(
        command=" ".join(["python", *sys.argv]),
        shape=a.shape,
        visual_tokens=n_vis,
        machine=torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores",
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        python=platform.python_version(),
        calls=a.calls,
        gap_us=a.gap_us,
        activities="CPU + CUDA" if cuda else "CPU",
    )
    results = []
    for spec in a.methods.split(","):
        m, _, b = spec.partition(":")
        mmsink.wrap(model, prune=m, budget=int(b) if b else None)
        first()
        first()  # the tail's graph is captured the second time
        plain = alternated({"plain": first}, a.calls, sync)["plain"] * 1e3  # the call without the profiler
        events = profiled([traced_call(model, first, sync)] * a.calls, cuda, sync)
        # (the GPU's timeline repeats the ranges as gpu_user_annotation)
        ranges = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(CALL)]
        calls = [call_summary(c, events, cuda, a.gap_us) for c in sorted(ranges, key=lambda e: e["ts"])]
        r = dict(config=spec, plain_wall_ms=round(plain, 4), **mean_of(calls), calls=calls)
        results.append(r)
        print(trace_section(r, a.gap_us))
        if a.host_profile:
            host_profile(first, a, spec)
        if a.out:  # after each config: a cut run keeps what it measured
            os.makedirs(a.out, exist_ok=True)
            base = os.path.join(a.out, f"ttft_trace_{a.shape}")
            with open(base + ".json", "w") as f:
                json.dump(dict(meta, results=results), f, indent=1)
            with open(base + ".md", "w") as f:
                f.write(trace_markdown(meta, results))
    mmsink.unwrap(model)


def host_profile(first, a, spec: str) -> None:
    """``a.calls`` steady-state calls under cProfile (the host's Python per function, no torch profiler):
    the 30 costliest by own time and by cumulative time printed, the stats saved (``pstats``) beside the
    trace when ``a.out``."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    for _ in range(a.calls):
        prof.runcall(first)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        prof.dump_stats(os.path.join(a.out, f"host_{a.shape}_{spec.replace(':', '_')}.prof"))
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(30)
        print(f"{spec}: host profile of {a.calls} calls by {key}\n{text.getvalue()}")


def num(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


def trace_section(r: dict, gap_us: float, top: int = 10) -> str:
    """One config: the totals, the stage table, the ``top`` longest gaps (in time order)."""
    head = (
        f"{r['config']}: call {r['wall_ms']:.2f} ms under the profiler ({r['plain_wall_ms']:.2f} ms without)"
    )
    if r["kinds"] is not None:
        kinds = ", ".join(f"{k} {r['kinds'][k]:.2f}" for k in KIND_NAMES)
        head += (
            f"; kernels {r['kernel_ms']:.2f} ms ({kinds}; {r['kernels']:g} kernels, "
            f"{r['graph_launches']:g} graph launches), GPU busy "
            f"{r['gpu_busy_ms']:.2f} ms, idle {r['gpu_idle_ms']:.2f} ms, of it {r['gap_ms']:.2f} ms in "
            f"{r['n_gaps']:g} gaps of {gap_us:g} us or more"
        )
    lines = [head, "", "| stage | host ms | GPU busy ms | GPU idle ms |", "|---|---|---|---|"]
    cells = [(s["name"], s["host_ms"], s["gpu_busy_ms"], s["gpu_idle_ms"]) for s in r["stages"]]
    for name, host, busy, idle in cells + [("call", r["wall_ms"], r["gpu_busy_ms"], r["gpu_idle_ms"])]:
        lines.append(f"| {name} | {host:.3f} | {num(busy, '.3f')} | {num(idle, '.3f')} |")
    longest = sorted(sorted(r["gaps"], key=lambda g: -g["us"])[:top], key=lambda g: g["start_ms"])
    if longest:
        lines += [
            "",
            f"The {len(longest)} longest idle gaps of the median call, in time order:",
            "",
            "| at ms | gap us | stage | host: its label, else aten ops, else CUDA calls | in ops us |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {g['start_ms']:.3f} | {g['us']:.1f} | {', '.join(NAMES.get(s, s) for s in g['stages'])} | "
            f"{g['host']} | {g['host_in_ops_us']:.1f} |"
            for g in longest
        ]
    return "\n".join(lines) + "\n"


def trace_markdown(meta: dict, results: list) -> str:
    lines = [
        f"# generate_fast prefill in steady state: GPU idle and the host then ({meta['shape']})",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}; batch 1, "
        f"{meta['visual_tokens']} visual tokens, max_new_tokens=1; the mean of {meta['calls']} profiled "
        f"calls after two warm-up calls (torch.profiler, {meta['activities']}: its per-operator cost is in "
        "the host times; the call's time without it alongside). GPU busy: the union of kernel, memcpy and "
        "memset spans (streams overlapping count once); idle = the call's wall time - busy. A stage's "
        "columns: its host span (stages marked without syncs), the GPU busy and idle inside it.",
        "",
    ]
    for r in results:
        lines += [f"## {r['config']}", "", trace_section(r, meta["gap_us"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- --count (CPU)
# results of a view / metadata op alias an input or hold no data: no kernel on a GPU, host work only
NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.lift_fresh.default"}
READ_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default"}
BUILDERS = (torch.tensor, torch.as_tensor, torch.asarray)  # tensors from host data


def launches_kernel(func) -> bool:
    if str(func) in NO_KERNEL or str(func) in READ_OPS:
        return False
    return not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class Meter(TorchDispatchMode):
    """aten operators per stage (inside a graph replay stand-in: ``<stage> replay``), and which tensors a
    GPU run holds on the device: those computed from ``seeds`` (the weights, the device inputs). A tensor
    built from host data alone, or by a factory alone, counts as a host one."""

    def __init__(self, seeds):
        super().__init__()
        self.stage, self.replaying = STAGES[0][0], False
        self.ops = collections.defaultdict(collections.Counter)
        self.host_ops = collections.defaultdict(collections.Counter)  # on host copies: no launch on a GPU
        self.on_host = False
        self.device = WeakTensorKeyDictionary()
        for t in seeds:
            self.device[t] = True

    @property
    def key(self) -> str:
        return self.stage + (" replay" if self.replaying else "")

    def on_device(self, tree) -> bool:
        return any(isinstance(t, torch.Tensor) and t in self.device for t in tree_leaves(tree))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.host_ops if self.on_host else self.ops)[self.key][func] += 1
        out = func(*args, **(kwargs or {}))
        if not self.on_host and self.on_device((args, kwargs)):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.device[t] = True
        return out


class StagedReads(TorchFunctionMode):
    """Host reads of tensor values (``mmsink.tools.reads``) per stage of ``meter`` and site; ``device``:
    of them, reads of device tensors (a sync each on a GPU); ``copies``: tensors built from host data for
    an explicitly named device (on a GPU a blocking copy, which waits for the queued work like a read)."""

    def __init__(self, meter):
        super().__init__()
        self.meter = meter
        self.by_stage = collections.defaultdict(collections.Counter)
        self.device = collections.defaultdict(collections.Counter)
        self.copies = collections.defaultdict(collections.Counter)
        self.early = collections.defaultdict(collections.Counter)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if is_read(func, args, kwargs):
            where = site()
            self.by_stage[self.meter.key][where] += 1
            if self.meter.on_device((args, kwargs)):
                self.device[self.meter.key][where] += 1
            return func(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if func in BUILDERS and args and not isinstance(args[0], torch.Tensor) and out.numel():
            pos = args[2] if func is torch.as_tensor and len(args) > 2 else None
            if (kwargs or {}).get("device", pos) is not None:  # (an empty one copies nothing)
                self.copies[self.meter.key][site()] += 1
        return out


def stand_in(meter):
    """A CUDA graph capture's stand-in: the function runs once; a replay runs it again (counted as the
    replay's) and copies into the captured outputs, as a replay writes the graph's own memory."""

    def capture(fn):
        out = fn()

        def replay():
            meter.replaying = True
            try:
                new = fn()
                pairs = zip(out, new) if isinstance(out, (list, tuple)) else [(out, new)]
                for o, n in pairs:
                    if o is not None:
                        o.copy_(n)
            finally:
                meter.replaying = False

        return out, replay

    return capture


@contextlib.contextmanager
def graphs_on_cpu(meter, cap=None):
    """generate_fast's CUDA-graph path (graphed tower, graphed tail) on a CPU model, replays stood in."""
    cap = cap or stand_in(meter)
    real = vision_graph.usable, vision_graph.patched, fastmod.capture_graph
    vision_graph.usable = lambda model, **kw: True
    vision_graph.patched = lambda model, taps, **kw: real[1](model, taps, capture=cap, **kw)
    fastmod.capture_graph = cap
    try:
        yield
    finally:
        vision_graph.usable, vision_graph.patched, fastmod.capture_graph = real


def summary(ops, reads, device, copies, early, host_ops) -> dict:
    """One stage: operators, kernels, syncs (device reads + blocking copies) and where they happen;
    ``early``: waits for the layout's host copies (queued before the tower: they wait for those alone)."""
    names = collections.Counter({str(f): c for f, c in ops.items()})
    return dict(
        ops=sum(ops.values()),
        kernels=sum(c for f, c in ops.items() if launches_kernel(f)),
        syncs=sum(device.values()) + sum(copies.values()),
        device_reads=sum(device.values()),
        copies=sum(copies.values()),
        early=sum(early.values()),
        host_ops=sum(host_ops.values()),
        reads=sum(reads.values()),
        host_built=names.get("aten.lift_fresh.default", 0),
        top_ops=dict(names.most_common(12)),
        sync_sites={short(s): c for s, c in sorted(device.items())},
        copy_sites={short(s): c for s, c in sorted(copies.items())},
        early_sites=dict(sorted(early.items())),
        host_read_sites={
            short(s): c - device.get(s, 0) for s, c in sorted(reads.items()) if c > device.get(s, 0)
        },
    )


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short(path: str) -> str:
    """A site's path from the repository's root or site-packages."""
    return path.split("site-packages/")[-1].removeprefix(ROOT + os.sep)


@contextlib.contextmanager
def early_copies(meter, reads):
    """The layout's host copies of ids and mask (``layout.host_copy``) are host tensors on a GPU too: one
    wait each prefill (``early``), for the copies alone (queued before the tower); the layout's work on
    them (``layout.Parts``, ``layout.pack``) runs on the host (``host_ops``: no kernel launch), and the
    tensors it sends (``layout.upload``: one copy) are device tensors."""
    if not hasattr(layout, "host_copy"):  # a tree from before the host copies
        yield
        return
    real, of, facts = layout.host_copy, layout.Parts.of.__func__, layout.Parts.facts
    pack, upload = layout.pack, layout.upload

    def host_copy(ids, mask):
        out = real(ids, mask)
        for t in (out.host_ids, out.host_mask):
            if t is not None and t in meter.device:
                del meter.device[t]
        reads.early[meter.key][short(site())] += 1
        return out

    def on_host(fn, probe):
        def run(first, *a, **k):
            prev = meter.on_host
            meter.on_host = prev or not meter.on_device(probe(first, a))
            try:
                return fn(first, *a, **k)
            finally:
                meter.on_host = prev

        return run

    def sent(tensors, device):  # the layout's tensors sent from the host are device tensors on a GPU
        out = upload(tensors, device)
        for t in out:
            meter.device[t] = True
        return out

    layout.host_copy, layout.upload = host_copy, sent
    layout.pack = on_host(pack, lambda tensors, a: None)
    layout.Parts.of = classmethod(on_host(of, lambda cls, a: a[0]))
    layout.Parts.facts = on_host(facts, lambda parts, a: parts.is_image)
    try:
        yield
    finally:
        layout.host_copy, layout.Parts.of, layout.Parts.facts = real, classmethod(of), facts
        layout.pack, layout.upload = pack, upload


def count_prefill(model, inputs) -> dict:
    """Per stage of one steady-state ``generate_fast(max_new_tokens=1)`` (graphs captured beforehand)."""
    # on a GPU every input is on the device but the image sizes (the family moves them to the host)
    seeds = [*model.parameters(), *model.buffers()]
    seeds += [v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k != "image_sizes"]
    meter = Meter(seeds)
    reads = StagedReads(meter)

    def mark(then, wait=True):
        meter.stage = then

    first = lambda: mmsink.generate_fast(model, max_new_tokens=1, graphs=True, **inputs)  # noqa: E731
    store.clear(model)  # graphs captured with other stand-ins
    with graphs_on_cpu(meter):
        for _ in range(3):  # tower graph captured on the first call, the tail's on the second
            first()
        with staged(model, mark), early_copies(meter, reads), reads, meter:
            tok = first()
    out = {}
    for key, _ in STAGES:
        for part in (key, key + " replay"):
            found = [meter.ops, reads.by_stage, reads.device, reads.copies, reads.early, meter.host_ops]
            if any(f.get(part) for f in found):
                out[part] = summary(*(f.get(part, collections.Counter()) for f in found))
    return dict(stages=out, token=tok[0, -1].item())


CLOCK = time.thread_time  # CPU time of the calling thread


class AtenClock(TorchDispatchMode):
    """Time spent inside aten operators, per stage of ``clock``."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.inside = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = CLOCK()
        out = func(*args, **(kwargs or {}))
        self.inside[self.clock.key] += CLOCK() - t0
        return out


def time_prefill(model, inputs, reps: int) -> dict:
    """Host time per stage on this CPU, ms, as this thread's CPU time (``CLOCK``: time other jobs take
    on a shared machine does not count; one torch thread while timing): ``wall`` (least of ``reps`` plain
    runs, marks only), ``aten`` (time inside aten operators, least of as many runs under a timing mode)
    and ``python`` = wall - aten: the Python around the operators (mmsink's, transformers', torch's
    wrappers), which a GPU run pays as well. The replays' time is kept apart (``<stage> replay``)."""

    class Clock:
        stage, replaying = STAGES[0][0], False

        @property
        def key(self):
            return self.stage + (" replay" if self.replaying else "")

    clock = Clock()
    spent = collections.Counter()
    stand = stand_in(clock)

    def timed_capture(fn):
        out, replay = stand(fn)

        def run():
            t0 = CLOCK()
            replay()
            spent[clock.stage + " replay"] += CLOCK() - t0

        return out, run

    def mark(then, wait=True):
        now = CLOCK()
        spent[clock.stage] += now - clock.t
        clock.stage, clock.t = then, now

    first = lambda: mmsink.generate_fast(model, max_new_tokens=1, graphs=True, **inputs)  # noqa: E731
    walls, insides = collections.defaultdict(list), collections.defaultdict(list)
    store.clear(model)  # graphs captured with other stand-ins
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with graphs_on_cpu(clock, timed_capture):
        for _ in range(3):
            first()
        for _ in range(reps):
            spent.clear()
            clock.stage, clock.t = STAGES[0][0], CLOCK()
            with staged(model, mark):
                first()
                mark("after")  # closes the last stage
            for k in list(spent):
                if k.endswith(" replay"):
                    spent[k.removesuffix(" replay")] -= spent[k]
            for k, v in spent.items():
                walls[k].append(v * 1e3)
            clock.stage = STAGES[0][0]
            aten = AtenClock(clock)
            with staged(model, lambda then, wait=True: setattr(clock, "stage", then)), aten:
                first()
            for k in walls:
                insides[k].append(aten.inside.get(k, 0.0) * 1e3)
    torch.set_num_threads(threads)
    out = {}
    for k, v in walls.items():  # the least of each (a shared machine only adds time)
        wall, inside = min(v), min(insides[k])
        out[k] = dict(wall=round(wall, 3), aten=round(inside, 3), python=round(wall - inside, 3))
    return out


def host_totals(stages: dict) -> dict:
    """Over the stages a GPU runs eagerly (graph replays left out)."""
    rows = [v for k, v in stages.items() if not k.endswith(" replay")]
    keys = ("ops", "kernels", "syncs", "device_reads", "copies", "early", "host_ops", "reads", "host_built")
    return {f: sum(r[f] for r in rows) for f in keys}


def count_main(a):
    torch.set_num_threads(a.threads)
    model = build(a.shape, "cpu", torch.float32)
    model.generation_config.eos_token_id = None
    inputs, n_vis = bench_inputs(model, 1, 35, 29, "cpu", grid=SHAPES[a.shape].get("grid"))
    results = []
    for spec in a.methods.split(","):
        m, _, b = spec.partition(":")
        mmsink.wrap(model, prune=m, budget=int(b) if b else None)
        try:
            r = count_prefill(model, inputs)
            if a.time_reps:
                r["time"] = time_prefill(model, inputs, a.time_reps)
        finally:
            mmsink.unwrap(model)
        r = dict(config=spec, host=host_totals(r["stages"]), **r)
        results.append(r)
        h = r["host"]
        print(
            f"{spec}: outside the graphs {h['ops']} ops ({h['kernels']} kernels), {h['syncs']} syncs "
            f"({h['device_reads']} device reads, {h['copies']} blocking copies; "
            f"{h['reads'] - h['device_reads']} host reads)"
        )
    meta = dict(
        command=" ".join(["python", *sys.argv]),
        shape=a.shape,
        visual_tokens=n_vis,
        machine="CPU, 2 cores, shared with other jobs",
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        python=platform.python_version(),
    )
    before = None
    if a.before:
        with open(a.before) as f:
            before = (os.path.basename(a.before), json.load(f)["results"])
    table = markdown(meta, results, before)
    print(table)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        base = os.path.join(a.out, f"host_ops_{a.shape}{a.tag}")
        with open(base + ".json", "w") as f:
            json.dump(dict(meta, results=results), f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(table)


def cell(s: dict | None, rep: dict | None = None) -> str:
    """ "ops (kernels) / syncs", "+Nh" host reads and "+N in graph" when there are any."""
    out = "-" if s is None else f"{s['ops']} ({s['kernels']}) / {s['syncs']}"
    if s is not None and s["reads"] > s["device_reads"]:
        out += f" +{s['reads'] - s['device_reads']}h"
    if s is not None and s.get("early"):
        out += f" +{s['early']}e"
    if s is not None and s.get("host_ops"):
        out += f" +{s['host_ops']} host ops"
    return out + (f" +{rep['ops']} in graph" if rep is not None else "")


def rows(results: list, cols: list) -> list:
    head = [
        "| config | " + " | ".join(NAMES[c] for c in cols) + " | outside graphs |",
        "|---" * (len(cols) + 2) + "|",
    ]
    return head + [
        f"| {r['config']} | "
        + " | ".join(cell(r["stages"].get(c), r["stages"].get(c + " replay")) for c in cols)
        + f" | {cell(r['host'])} |"
        for r in results
    ]


def time_rows(results: list, cols: list, meta: dict) -> list:
    """Host ms per stage (``time_prefill``): Python (wall minus aten) / wall, and the sum outside graphs."""
    lines = [
        f"Host time per stage on this CPU ({meta['machine']}), ms of the thread's CPU time (one torch "
        "thread): Python around the operators (all minus the time inside aten operators) / all (least of "
        "the timed runs; all includes the CPU's own operator work, which a GPU queues instead). Outside "
        "graphs: the sum over the stages a GPU runs eagerly.",
        "",
        "| config | " + " | ".join(NAMES[c] for c in cols) + " | outside graphs |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for r in results:
        t = r.get("time")
        if t is None:
            continue
        cells = [f"{t[c]['python']:.2f} / {t[c]['wall']:.2f}" if c in t else "-" for c in cols]
        py = sum(v["python"] for k, v in t.items() if not k.endswith(" replay"))
        wall = sum(v["wall"] for k, v in t.items() if not k.endswith(" replay"))
        lines.append(f"| {r['config']} | " + " | ".join(cells) + f" | {py:.2f} / {wall:.2f} |")
    return lines


def markdown(meta: dict, results: list, before: tuple | None = None) -> str:
    cols = [k for k, _ in STAGES if any(k in r["stages"] for r in results)]
    lines = [
        f"# generate_fast prefill: host operators and syncs per stage ({meta['shape']})",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}; batch 1, "
        f"{meta['visual_tokens']} visual tokens, max_new_tokens=1, graph path with replay stand-ins.",
        "",
        "Cells: aten operators dispatched (of them launching a kernel; the rest are views and metadata) / "
        "syncs on a GPU: reads of device values and tensors built from host data for a named device (a "
        "blocking copy); `+Nh`: reads of tensors a GPU run keeps on the host (no sync). Tower and tail: what "
        "their graph wrappers run besides the replay; `+N in graph`: the replay's operators (one graph "
        "launch on a GPU).",
        "",
        *rows(results, cols),
    ]
    if before:
        lines += ["", f"Before (`{before[0]}`):", "", *rows(before[1], cols)]
    if any("time" in r for r in results):
        lines += ["", *time_rows(results, cols, meta)]
        if before and any("time" in r for r in before[1]):
            lines += ["", f"Before (`{before[0]}`):", "", *time_rows(before[1], cols, meta)]
    lines += ["", "Sync sites (stage: count file:line; device reads, blocking copies, then host reads):", ""]
    for r in results:
        sites = [
            f"{stage}: {c} {s}{kind}"
            for stage, v in r["stages"].items()
            for kind, found in (
                ("", v["sync_sites"]),
                (" (copy)", v["copy_sites"]),
                (" (early host copy)", v.get("early_sites", {})),
                (" (host)", v["host_read_sites"]),
            )
            for s, c in found.items()
        ]
        lines.append(f"- {r['config']}: " + ("; ".join(sites) if sites else "none"))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES))
    ap.add_argument("--methods", default=None)
    ap.add_argument("--count", action="store_true", help="operators and reads per stage, on the CPU")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-reps", type=int, default=5, help="--count: timed runs per config (0: none)")
    ap.add_argument("--tag", default="", help="suffix of the --count output files")
    ap.add_argument("--before", default=None, help="a --count JSON to show below this run's table")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="timed mode: cuda (cpu: a smoke run of the script)")
    ap.add_argument("--reps", type=int, default=7, help="timed mode: alternated runs per config")
    ap.add_argument("--ideal", action="store_true", help="timed mode: also time each method's plan replayed")
    ap.add_argument("--plain-step", action="store_true", help="timed mode: also time generate_fast(step={})")
    ap.add_argument("--trace", action="store_true", help="GPU idle gaps and the host's work then (profiler)")
    ap.add_argument("--calls", type=int, default=3, help="--trace: steady-state calls profiled per config")
    ap.add_argument("--host-profile", action="store_true", help="--trace: also the calls under cProfile")
    ap.add_argument("--gap-us", type=float, default=20.0, help="--trace: shortest idle gap listed, us")
    a = ap.parse_args()
    if a.trace:
        a.shape = a.shape or "llava-next-7b"
        a.methods = a.methods or "none,visionzip:320,fastv:320"
        trace_main(a)
    elif a.count:
        a.shape = a.shape or "tiny-next-cpu"
        a.methods = a.methods or "none,visionzip:320,fastv:320,dart:320,visipruner:320"
        count_main(a)
    else:
        a.shape = a.shape or "llava-next-7b"
        a.methods = a.methods or "none,fastv:320,visionzip:320"
        timed_main(a)


if __name__ == "__main__":
    main()
