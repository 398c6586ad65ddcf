"""Op and sync counts of the selection step, per method, on a CPU (issue 20: selection overhead).

    python evals/selection_ops.py --batch 1,16 --methods fastv,dart,visipruner,visionzip --budget 64

A LLaVA-1.5-shaped model (576 visual tokens a prompt, 32 layers, the bench's 35 + 29 text tokens) at a
tiny width, so that what is counted is the number of operations, not their size. Per method, one
prefill after a warm one: the aten ops (views aside) of the whole prefill and of the method's own hooks
(``after_layer``, ``before_llm``, the vision-stage ``select`` and the attention edits it hands the
layers), the same prefill with the method's plan replayed (``prune='replay'``, the bench's ideal row),
and the host syncs: reads of device values (``.item()``, ``.tolist()``, ``nonzero``, boolean indexing
...; see ``mmsink.tools.reads``) and tensors built from host data (``aten::lift_fresh``: on a GPU a
blocking copy that waits for the device like a read does), in the hooks and in the prefill's mmsink code.
``--graphs``: the pruners' selection loops (``core.graphs.Graphed``) run as on a GPU, through a stand-in
capture: a replay counts as one launch (``graph launch``), the ops inside it apart.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmsink
from mmsink.core import graphs
from mmsink.tools.bench import bench_inputs, build, environment
from mmsink.tools.reads import DeviceReads, selection_hooks

SHAPE = "selection-ops"
HOST_DATA = {"aten.lift_fresh.default"}  # torch.tensor(host data): a blocking host-to-device copy on a GPU
# a Python number handed to an op (torch.where(c, x, 0.0)) becomes a 0-dim host tensor: no launch
NO_LAUNCH = {"aten.scalar_tensor.default"}


class Ops(TorchDispatchMode):
    """Counts aten ops other than views (after autograd and composite decomposition: roughly the kernels
    launched); inside a region (``enter(name)`` ... ``leave()``, nested regions count as the outermost)
    also per op and per region name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.depth = 0  # > 0 while a region (a method hook, a marked function) runs
        self.region = None  # the outermost running region's name
        self.region_ops = collections.Counter()
        self.per_region = collections.Counter()
        self.graphed, self.in_graphs = False, 0

    def stand_in(self):
        """A capture for ``core.graphs.Graphed`` as on a GPU: the function's ops inside a replay are
        counted apart (``in_graphs``); a replay counts as one launch (``graph launch``)."""

        def capture(fn):
            out = fn()

            def replay():
                self.graphed = True
                try:
                    graphs.load(out, fn())  # (the outputs written in place: inside the graph too)
                finally:
                    self.graphed = False
                self.note("graph launch")

            return out, replay

        return capture

    def enter(self, name: str) -> None:
        if not self.depth:
            self.region = name
        self.depth += 1

    def leave(self) -> None:
        self.depth -= 1
        if not self.depth:
            self.region = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        # views launch nothing (lift_fresh is one, but copies)
        if (not func.is_view or name in HOST_DATA) and name not in NO_LAUNCH:
            if self.graphed:  # inside a graph replay (``--graphs``): counted apart, the replay one launch
                self.in_graphs += 1
            else:
                self.note(name)
        return func(*args, **(kwargs or {}))

    def note(self, name: str) -> None:
        self.ops[name] += 1
        if self.depth:
            self.region_ops[name] += 1
            self.per_region[self.region] += 1


def hooks_counted(pruner, ops: Ops, reads: dict):
    """Count the ops and reads made inside the pruner's hooks (and the attention edits they return)."""

    def counted(fn, name):
        def run(*a, **k):
            ops.enter("attention edits" if name.endswith("attention edit") else name)
            try:
                with DeviceReads() as r:
                    return fn(*a, **k)
            finally:
                ops.leave()
                reads["hooks"] += r.total

        return run

    return selection_hooks(pruner, counted)


def count(model, inputs, method: str, budget, plan=None, graphed: bool = False) -> dict:
    """``graphed``: the pruner's ``core.graphs.Graphed`` loops as on a GPU (replays counted apart)."""
    if method == "replay":
        mmsink.wrap(model, prune="replay", plan=plan)
    else:
        mmsink.wrap(model, prune=method, budget=budget)
    pruner = mmsink.api.get_handle(model).pruner
    ops, reads = Ops(), {"hooks": 0}
    real = graphs.is_cuda, graphs.capture
    if graphed:
        graphs.is_cuda, graphs.capture = (lambda t: True), ops.stand_in()
    try:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)  # warm (the replay builds its masks once; graphs captured)
            with hooks_counted(pruner, ops, reads), DeviceReads() as r, ops:
                model(**inputs, logits_to_keep=1)
        st = mmsink.stats(model)
    finally:
        graphs.is_cuda, graphs.capture = real
        mmsink.unwrap(model)
    mine = sum(c for s, c in r.sites.items() if "/mmsink/" in s)
    return {
        "ops": sum(ops.ops.values()),
        "hook_ops": sum(ops.region_ops.values()),
        "hook_reads": reads["hooks"],
        "hook_host_data": sum(ops.region_ops[n] for n in HOST_DATA),
        "mmsink_reads": mine,
        "host_data": sum(ops.ops[n] for n in HOST_DATA),
        "in_graphs": ops.in_graphs,
        "graph_launches": ops.region_ops["graph launch"],
        "top_hook_ops": ops.region_ops.most_common(8),
        "per_hook": dict(ops.per_region),
        "plan": st.kept_indices,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--methods", default="fastv,dart,visipruner,visionzip")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the counts as JSON here, the table as .md beside it")
    ap.add_argument("--machine", default="", help="what the machine was (e.g. shared), written with --out")
    ap.add_argument(
        "--graphs", action="store_true", help="selection loops replayed as on a GPU (core.graphs.Graphed)"
    )
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = build(SHAPE)
    rows = []
    table = [
        "| batch | method | prefill ops | replay ops | extra ops | hook ops | hook syncs (reads + host data) "
        "| mmsink reads in the prefill (replay) | ops inside graph replays |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print(*table, sep="\n")
    for b in [int(x) for x in a.batch.split(",")]:
        inputs, _ = bench_inputs(model, b, 35, 29)
        for method in a.methods.split(","):
            m = count(model, inputs, method, a.budget, graphed=a.graphs)
            rp = count(model, inputs, "replay", None, plan=m.pop("plan"))
            rp.pop("plan")
            rows.append({"batch": b, "method": method, "method_counts": m, "replay_counts": rp})
            table.append(
                f"| {b} | {method} | {m['ops']} | {rp['ops']} | {m['ops'] - rp['ops']} | {m['hook_ops']} | "
                f"{m['hook_reads']} + {m['hook_host_data']} | {m['mmsink_reads']} ({rp['mmsink_reads']}) | "
                f"{m['in_graphs']} |"
            )
            print(table[-1], flush=True)
    for row in rows:
        m = row["method_counts"]
        print(row["batch"], row["method"], "hook ops by hook:", m["per_hook"], "top:", m["top_hook_ops"])
    if a.out:
        command = "python evals/selection_ops.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        env = {**environment(), "cores": os.cpu_count(), "note": a.machine}
        with open(a.out, "w") as f:
            json.dump({"command": command, "environment": env, "rows": rows}, f, indent=1)
        head = f"# Selection ops (issue 20)\n\n    {command}\n\n{json.dumps(env)}\n\n"
        with open(a.out.removesuffix(".json") + ".md", "w") as f:
            f.write(head + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
