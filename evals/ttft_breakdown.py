"""Where does generate_fast's time to first token go? Stage by stage, batch 1.

    python evals/ttft_breakdown.py --shape llava-next-7b --methods none,fastv:320,visionzip:320
    python evals/ttft_breakdown.py --count --shape tiny-next-cpu --out evals/results/fast_path/next_host_ops

Hooks on the model's own modules mark the end of each stage: before the vision tower, the tower, the
projector (a vision-stage pruner selects in its pre-hook), LLaVA-NeXT's merge (unpad, newline tokens,
packing: the end of ``get_image_features``), the features placed in the embeddings (the language model's
start), the plan set up (rotary tables, mask, the first layer's plan), layers run eagerly before the
hand-off (with the pruner's selection), the graphed tail, and what follows to the token.

Timed (GPU): each mark stamps the clock after a device sync (a stage's time is its host work plus its
kernels, no overlap between stages); the synced run is slower than a plain one, both totals are printed.

``--count`` (CPU): per stage, the aten operators dispatched (each a kernel launch or a view: host work on
a GPU) and the syncs a GPU run would make: reads of values computed from the weights or the device inputs
(reads of tensors a GPU run keeps on the host are listed apart), and tensors built from host data for a
named device (a blocking copy). The tower and the tail run through the same graph wrappers as on a GPU
with a replay stand-in; what runs inside a replay is counted apart (one graph launch on a GPU).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import sys
import time

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

import mmsink
from mmsink.fast import decode as fastmod
from mmsink.fast import vision_graph
from mmsink.tools.bench import SHAPES, bench_inputs, build, timed
from mmsink.tools.reads import is_read, site

STAGES = [
    ("before_tower", "before the vision tower"),
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
    """Inside the block, ``mark(done, then)`` is called where stage ``done`` of a prefill ends and ``then``
    begins (keys of STAGES)."""
    inner = model.model

    def at(done, then):
        return lambda *_: mark(done, then)

    hooks = [
        inner.vision_tower.register_forward_pre_hook(at("before_tower", "tower")),
        inner.vision_tower.register_forward_hook(at("tower", "projector")),
        inner.multi_modal_projector.register_forward_hook(at("projector", "merge")),
        inner.language_model.register_forward_pre_hook(at("placement", "plan")),
        # after mmsink's own pre-hook (registered first); not reached when it hands off at layer 0
        inner.language_model.layers[0].register_forward_pre_hook(at("plan", "eager_layers")),
    ]
    features = inner.get_image_features

    def get_image_features(*a, **k):
        out = features(*a, **k)
        mark("merge", "placement")
        return out

    real = fastmod.FastDecoder.run_tail

    def run_tail(self, first, *a, **k):
        mark("eager_layers" if first else "plan", "tail")
        out = real(self, first, *a, **k)
        mark("tail", "after")
        return out

    inner.get_image_features = get_image_features
    fastmod.FastDecoder.run_tail = run_tail
    try:
        yield
    finally:
        fastmod.FastDecoder.run_tail = real
        del inner.get_image_features
        for h in hooks:
            h.remove()


def stamps(model, fn) -> list:
    marks = []

    def mark(name, _then):
        torch.cuda.synchronize()
        marks.append((name, time.perf_counter()))

    with staged(model, mark):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        end = time.perf_counter()
    rows, prev = [], t0
    for name, t in marks + [("after", end)]:
        rows.append((NAMES[name], (t - prev) * 1e3))
        prev = t
    return rows


def timed_main(a):
    model = build(a.shape, "cuda", torch.bfloat16)
    model.generation_config.eos_token_id = None
    inputs, _ = bench_inputs(model, 1, 35, 29, "cuda", torch.bfloat16, grid=SHAPES[a.shape].get("grid"))
    first = lambda: mmsink.generate_fast(model, max_new_tokens=1, **inputs)  # noqa: E731
    out = []
    for spec in a.methods.split(","):
        m, _, b = spec.partition(":")
        mmsink.wrap(model, prune=m, budget=int(b) if b else None)
        first()  # (and ``timed``'s own warm-up: the tail's graph is captured the second time)
        plain = timed(first, 7, torch.cuda.synchronize) * 1e3
        stamps(model, first)  # twice: the second is reported
        rows = stamps(model, first)
        total = sum(t for _, t in rows)
        print(f"{spec}: TTFT {plain:.1f} ms (synced stages: {total:.1f} ms)")
        for name, t in rows:
            print(f"    {t:7.2f} ms  {name}")
        out.append(dict(config=spec, ttft_ms=plain, stages=rows))
    mmsink.unwrap(model)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"ttft_breakdown_{a.shape}.json"), "w") as f:
            json.dump(out, f, indent=1)


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
        self.device = WeakTensorKeyDictionary()
        for t in seeds:
            self.device[t] = True

    @property
    def key(self) -> str:
        return self.stage + (" replay" if self.replaying else "")

    def on_device(self, tree) -> bool:
        return any(isinstance(t, torch.Tensor) and t in self.device for t in tree_leaves(tree))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self.key][func] += 1
        out = func(*args, **(kwargs or {}))
        if self.on_device((args, kwargs)):
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
def graphs_on_cpu(meter):
    """generate_fast's CUDA-graph path (graphed tower, graphed tail) on a CPU model, replays stood in."""
    cap = stand_in(meter)
    real = vision_graph.usable, vision_graph.patched, fastmod.capture_graph
    vision_graph.usable = lambda model: True
    vision_graph.patched = lambda model, taps: real[1](model, taps, capture=cap)
    fastmod.capture_graph = cap
    try:
        yield
    finally:
        vision_graph.usable, vision_graph.patched, fastmod.capture_graph = real


def summary(ops, reads, device, copies) -> dict:
    """One stage: operators, kernels, syncs (device reads + blocking copies) and where they happen."""
    names = collections.Counter({str(f): c for f, c in ops.items()})
    return dict(
        ops=sum(ops.values()),
        kernels=sum(c for f, c in ops.items() if launches_kernel(f)),
        syncs=sum(device.values()) + sum(copies.values()),
        device_reads=sum(device.values()),
        copies=sum(copies.values()),
        reads=sum(reads.values()),
        host_built=names.get("aten.lift_fresh.default", 0),
        top_ops=dict(names.most_common(12)),
        sync_sites={short(s): c for s, c in sorted(device.items())},
        copy_sites={short(s): c for s, c in sorted(copies.items())},
        host_read_sites={
            short(s): c - device.get(s, 0) for s, c in sorted(reads.items()) if c > device.get(s, 0)
        },
    )


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short(path: str) -> str:
    """A site's path from the repository's root or site-packages."""
    return path.split("site-packages/")[-1].removeprefix(ROOT + os.sep)


def count_prefill(model, inputs) -> dict:
    """Per stage of one steady-state ``generate_fast(max_new_tokens=1)`` (graphs captured beforehand)."""
    # on a GPU every input is on the device but the image sizes (the family moves them to the host)
    seeds = [*model.parameters(), *model.buffers()]
    seeds += [v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k != "image_sizes"]
    meter = Meter(seeds)
    reads = StagedReads(meter)

    def mark(_done, then):
        meter.stage = then

    first = lambda: mmsink.generate_fast(model, max_new_tokens=1, graphs=True, **inputs)  # noqa: E731
    with graphs_on_cpu(meter):
        for _ in range(3):  # tower graph captured on the first call, the tail's on the second
            first()
        with staged(model, mark), reads, meter:
            tok = first()
    out = {}
    for key, _ in STAGES:
        for part in (key, key + " replay"):
            found = [meter.ops, reads.by_stage, reads.device, reads.copies]
            if any(f.get(part) for f in found):
                out[part] = summary(*(f.get(part, collections.Counter()) for f in found))
    return dict(stages=out, token=tok[0, -1].item())


def host_totals(stages: dict) -> dict:
    """Over the stages a GPU runs eagerly (graph replays left out)."""
    rows = [v for k, v in stages.items() if not k.endswith(" replay")]
    keys = ("ops", "kernels", "syncs", "device_reads", "copies", "reads", "host_built")
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
    lines += ["", "Sync sites (stage: count file:line; device reads, blocking copies, then host reads):", ""]
    for r in results:
        sites = [
            f"{stage}: {c} {s}{kind}"
            for stage, v in r["stages"].items()
            for kind, found in (
                ("", v["sync_sites"]),
                (" (copy)", v["copy_sites"]),
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
    ap.add_argument("--tag", default="", help="suffix of the --count output files")
    ap.add_argument("--before", default=None, help="a --count JSON to show below this run's table")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.count:
        a.shape = a.shape or "tiny-next-cpu"
        a.methods = a.methods or "none,visionzip:320,fastv:320,dart:320,visipruner:320"
        count_main(a)
    else:
        a.shape = a.shape or "llava-next-7b"
        a.methods = a.methods or "none,fastv:320,visionzip:320"
        timed_main(a)


if __name__ == "__main__":
    main()
