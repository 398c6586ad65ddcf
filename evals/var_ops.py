"""VAR's op and sync counts per prefill and per decode step, on a CPU (issue 20: VAR's host-bound prefill).

    python evals/var_ops.py --batch 1,16 --out evals/results/var_ops/after.json
    python evals/var_ops.py --batch 1,16 --compile --out evals/results/var_ops/compiled.json

The LLaVA-1.5-shaped model of ``evals/selection_ops.py`` (576 visual tokens a prompt, 32 layers, the
bench's 35 + 29 text tokens) at a tiny width, so that what is counted is the number of operations, not
their size; VAR as the bench adds it (``--var-tau``: sink channels 1415 and 2533 modulo the width, tau 3;
layers 2 .. 30). Per batch: the aten ops (views aside) of one prefill after a warm one, unwrapped and with
VAR, their difference per VAR layer, the ops inside VAR's own functions (``key_codes``: the layer's sink
groups; ``var_attention``: the edited attention), the host syncs (device reads and tensors built from
host data) and one ``generate_fast`` decode step (eager, no graph) with VAR against the plain step.

``--compile``: VAR's per-layer work through ``torch.compile`` (``VARConfig(compile=True)``, the CUDA
default) on this CPU. A compiled call runs outside the counting modes (the compiler refuses them) under
the profiler; what its graph launches (Inductor's fused C++ kernels, the aten ops it calls) is counted as
ops, and the calls themselves are counted apart (each costs the host a guard check and a wrapper). On a
GPU Inductor groups kernels for Triton, so the count there can differ by a few.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shlex
import sys

import torch
from mmsink.evals.selection_ops import HOST_DATA, Ops
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import _disable_current_modes

import mmsink
from mmsink.fast import decode as fastmod
from mmsink.sinks import var as var_mod
from mmsink.tools.bench import bench_inputs, build, environment
from mmsink.tools.reads import DeviceReads

SHAPE = "selection-ops"
FUNCTIONS = ("key_codes", "var_attention")
NO_KERNEL = ("empty", "as_strided", "view", "reinterpret", "resolve_conj", "alias", "detach")


@contextlib.contextmanager
def no_modes():
    """Torch function and dispatch modes off inside (the counting and reads modes), back after."""
    popped = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
    try:
        with _disable_current_modes():
            yield
    finally:
        for mode in reversed(popped):
            torch._C._push_on_torch_function_stack(mode)


class CompiledCounts:
    """Calls of VAR's compiled functions (``var.Compiled``, every wrap's) replaced by ones that count, per
    call, the kernels the compiled graph launches (profiler events directly under the graph's call;
    allocations and views aside) as ops of ``ops`` (in the running region), and the calls."""

    def __init__(self, ops: Ops):
        self.ops, self.calls = ops, collections.Counter()
        self.saved = var_mod.Compiled.__call__

    def __enter__(self):
        call = self.saved

        def counting(c, *a):
            name = c.fn.__name__.removesuffix("_eager").removesuffix("_fused")  # CompiledVAR's names
            return self.run(name, lambda *x: call(c, *x), a)

        var_mod.Compiled.__call__ = counting
        return self

    def __exit__(self, *exc):
        var_mod.Compiled.__call__ = self.saved

    def run(self, name, fn, args):
        with no_modes(), profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn(*args)
        graphs = [e for e in prof.events() if e.name.startswith("## Call CompiledFxGraph")]
        if not graphs:
            raise RuntimeError(f"var_ops: VAR's {name} did not run compiled")
        self.calls[name] += 1
        for e in prof.events():
            parent = e.cpu_parent
            if parent is None or not parent.name.startswith("## Call CompiledFxGraph"):
                continue
            if "cpp_fused" in e.name or "triton" in e.name:
                op = "inductor kernel"  # (named after what it fused: views among them)
            elif any(w in e.name for w in NO_KERNEL):
                continue
            else:
                op = e.name
            self.ops.ops[op] += 1
            if self.ops.depth:
                self.ops.region_ops[op] += 1
                self.ops.per_region[self.ops.region] += 1
        return out


def marked(module, name: str, ops: Ops):
    """``module.name`` replaced by a wrapper that counts the ops it makes as region ``name``."""
    fn = getattr(module, name)

    def run(*a, **k):
        ops.enter(name)
        try:
            return fn(*a, **k)
        finally:
            ops.leave()

    setattr(module, name, run)
    return fn


def counted(call, funcs=()) -> dict:
    """Ops, the ops inside ``funcs`` ((module, name) pairs), device reads and host-data tensors of
    ``call()``."""
    ops = Ops()
    saved = [(m, n, marked(m, n, ops)) for m, n in funcs]
    try:
        with CompiledCounts(ops) as comp, DeviceReads() as r, ops:
            call()
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)
    return {
        "ops": sum(ops.ops.values()),
        "compiled_calls": dict(comp.calls),
        "inside": dict(ops.per_region),
        "reads": r.total,
        "host_data": sum(ops.ops[n] for n in HOST_DATA),
        "by_op": dict(ops.ops),
    }


def decoder_step(model, inputs) -> dict:
    """One decode step of ``generate_fast``'s decoder (the one its last call used), eager."""
    with torch.no_grad():
        mmsink.generate_fast(model, max_new_tokens=3, graphs=False, compile=False, **inputs)
        dec = next(reversed(model.__dict__[fastmod.STORE].values()))
        dec.t.zero_()
        dec.step()  # warm
        dec.t.zero_()
        return counted(dec.step, [(fastmod, "decode_attention")])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--tau", type=float, default=3.0, help="VAR's sink threshold (the bench's --var-tau)")
    ap.add_argument("--out", default=None, help="write the counts as JSON here, the table as .md beside it")
    ap.add_argument("--machine", default="", help="what the machine was (e.g. shared), written with --out")
    ap.add_argument("--compile", action="store_true", help="VAR's per-layer work through torch.compile")
    a = ap.parse_args(argv)
    if a.compile:
        from torch._inductor import config as inductor

        inductor.cpp.enable_kernel_profile = True  # the fused kernels as profiler events
    torch.manual_seed(0)
    model = build(SHAPE)
    model.generation_config.eos_token_id = None  # random weights: fixed lengths
    hidden = model.config.get_text_config().hidden_size
    layers = model.config.get_text_config().num_hidden_layers
    cfg = {"sink_dims": tuple(d % hidden for d in (1415, 2533)), "tau": a.tau}
    if a.compile:
        cfg["compile"] = True
    n_var = sum(var_mod.VARConfig(**cfg).active(i, layers) for i in range(layers))
    funcs = [(var_mod, f) for f in FUNCTIONS]
    rows = []
    table = [
        "| batch | plain prefill ops | VAR prefill ops | extra ops | per VAR layer | in key_codes / "
        "var_attention per layer | reads + host data (plain; VAR) | decode step ops plain / VAR "
        "| per VAR layer | compiled calls per VAR layer (prefill; decode) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print(*table, sep="\n")
    for b in [int(x) for x in a.batch.split(",")]:
        inputs, _ = bench_inputs(model, b, 35, 29)
        res = {}
        for name in ("plain", "var"):
            if name == "var":
                mmsink.wrap(model, prune=None, var=cfg)
            try:
                with torch.no_grad():
                    model(**inputs, logits_to_keep=1)  # warm
                    res[name] = counted(lambda x=inputs: model(**x, logits_to_keep=1), funcs)
                res[name + "_decode"] = decoder_step(model, inputs)
            finally:
                if name == "var":
                    mmsink.unwrap(model)
        p, v, pd, vd = res["plain"], res["var"], res["plain_decode"], res["var_decode"]
        extra = v["ops"] - p["ops"]
        per = {f: round(v["inside"].get(f, 0) / n_var, 1) for f in FUNCTIONS}
        dx = (vd["ops"] - pd["ops"]) / n_var
        calls = [round(sum(x["compiled_calls"].values()) / n_var, 1) for x in (v, vd)]
        rows.append({"batch": b, "var_layers": n_var, "extra_ops": extra, **res})
        table.append(
            f"| {b} | {p['ops']} | {v['ops']} | {extra} | {extra / n_var:.1f} | {per['key_codes']} / "
            f"{per['var_attention']} | {p['reads']} + {p['host_data']}; {v['reads']} + {v['host_data']} | "
            f"{pd['ops']} / {vd['ops']} | {dx:.1f} | {calls[0]}; {calls[1]} |"
        )
        print(table[-1], flush=True)
    if a.out:
        command = "python evals/var_ops.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        env = {**environment(), "cores": os.cpu_count(), "note": a.machine, "var": cfg}
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"command": command, "environment": env, "rows": rows}, f, indent=1)
        head = f"# VAR ops (issue 20)\n\n    {command}\n\n{json.dumps(env)}\n\n"
        with open(a.out.removesuffix(".json") + ".md", "w") as f:
            f.write(head + "\n".join(table) + "\n")
    return rows


if __name__ == "__main__":
    main()
