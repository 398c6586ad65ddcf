"""Why ``generate_fast``'s kv modes serve slower than plain decoding (issue 17), measured without a GPU.

    python -m evals.kv_serving_cpu --out evals/results/kv_decode/serving_cpu

Two parts.

``step``: one decode step of each mode's decoder at the real LLaVA-NeXT-7B shape on ``meta`` tensors
(no memory, no compute; ``evals.op_cost.OpCost``): aten ops and estimated bytes read / written. Buffers
as ``serve-bench`` sizes them for its prompt (2993 tokens, 63 decode steps): dense 3072 slots, window
2048 + 4 sinks 2176, int4 3072 (group 32), LFPS 3072 (its dense first steps and its sparse steps). SDPA is
counted as one fused kernel reading q, k, v and the mask (on a GPU it is; on meta it would decompose), and
in-place index writes (``index_copy_``, ``scatter_``, ``index_fill_``) as the rows they write, not the whole
buffer. Estimated ms = bytes / 4.8 TB/s (H200 HBM): a floor, not a measurement.

``cpu``: real runs on the CPU with ``tiny-next-cpu`` (serve-bench's CPU shape, the same 2993-token prompt)
at batch 1, 2 and 4: per mode the aten ops and host syncs (``aten._local_scalar_dense`` / ``nonzero`` /
``lift_fresh``, and Python-level reads from ``mmsink.tools.reads``) of the prefill (the model's forward),
of the decoder's ``fill`` and of one decode step, and the graph captures over three calls with a CPU
stand-in for CUDA-graph capture (1 per decoder: no re-capture per call). Also, for the first call, the
most bytes alive at once and the bytes alive when ``fill`` starts (``LiveBytes``: tensors made in the call,
weights aside). ``--step-batches ''`` skips ``step``.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from evals.op_cost import OpCost, footprint

HBM = 4.8e12  # H200 bytes / s
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.lift_fresh.default"}


class StepCost(OpCost):
    """``OpCost`` with in-place index writes counted as the rows they write."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        kwargs = kwargs or {}
        if name in ("aten.index_copy_.default", "aten.scatter_.src", "aten.index_fill_.int_Scalar"):
            out = func(*args, **kwargs)
            dst, dim, index = args[0], args[1], args[2]
            if name == "aten.index_fill_.int_Scalar":
                rows = dst.numel() // max(dst.shape[dim], 1) * index.numel()
                moved = rows * dst.element_size()
            else:
                moved = (
                    index.numel() * dst.element_size() if name == "aten.scatter_.src" else footprint(args[3])
                )
            self.rows.append((name.replace("aten.", ""), moved + footprint(index), moved, tuple(dst.shape)))
            return out
        return super().__torch_dispatch__(func, types, args, kwargs)


def fused_sdpa(cost: StepCost):
    """An SDPA stand-in for ``cost``: one row reading q, k, v and the mask, an output of q's shape."""

    def sdpa(q, k, v, attn_mask=None, **kw):
        read = sum(footprint(t) for t in (q, k, v) + ((attn_mask,) if attn_mask is not None else ()))
        cost.rows.append(("sdpa (fused)", read, footprint(q), tuple(q.shape)))
        return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)

    return sdpa


def step_costs(batch: int) -> list[dict]:
    """One step per mode at LLaVA-NeXT-7B's shape on meta tensors (see the module docstring)."""
    from mmsink import patches
    from mmsink.fast.decode import FastDecoder
    from mmsink.kv.config import KVConfig
    from mmsink.kv.fast import WindowDecoder
    from mmsink.kv.fast_quant import QuantDecoder
    from mmsink.kv.fast_sparse import SparseDecoder
    from mmsink.tools.bench import build

    fam = patches.llava_next.Family(build("llava-next-7b", "meta").to(torch.bfloat16))
    n = len(fam.layers)
    inv = fam.language_model.rotary_emb.inv_freq
    window = KVConfig(window=2048, sinks=4)
    lfps = KVConfig(sparse="lfps", topk=512)
    decoders = [
        ("dense (none)", lambda: FastDecoder(fam, [3072] * n, batch, 128, ())),
        ("window2048", lambda: WindowDecoder(fam, window, inv, 2176, [2176], [0] * n, batch, 128, (), False)),
        ("int4", lambda: QuantDecoder(fam, KVConfig(quant="int4"), 3072, [3072], [0] * n, 4, batch, 128, ())),
        ("lfps512 dense step", lambda: SparseDecoder(fam, lfps, [3072] * n, batch, 128, ())),
        ("lfps512 sparse step", lambda: SparseDecoder(fam, lfps, [3072] * n, batch, 128, ())),
    ]
    rows = []
    for name, make in decoders:
        dec = make()
        if name.startswith("lfps"):
            dec.dense = "dense" in name
        kv = sum(
            t.numel() * t.element_size()
            for f in ("k", "v", "raw", "kc", "ks", "kz", "vc", "vs", "vz", "xk", "xv")
            for t in getattr(dec, f, None) or []
        )
        cost = StepCost()
        real = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = fused_sdpa(cost)
        try:
            with cost:
                dec.step()
        finally:
            F.scaled_dot_product_attention = real
        s = cost.summary()
        moved = s["read_bytes"] + s["written_bytes"]
        rows.append(
            dict(
                mode=name,
                batch=batch,
                kv_mib_per_seq=kv / batch / 2**20,
                ops=s["ops"],
                read_gb=s["read_bytes"] / 1e9,
                written_gb=s["written_bytes"] / 1e9,
                est_ms=moved / HBM * 1e3,
                top=s["top"][:5],
            )
        )
        print(f"step {name} batch {batch}: {s['ops']} ops, {moved / 1e9:.1f} GB", flush=True)
        del dec
    return rows


class Counted(TorchDispatchMode):
    """Aten ops (views aside) and sync ops."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not func.is_view or name in SYNC_OPS:
            self.ops += 1
        if name in SYNC_OPS:
            self.syncs[name.replace("aten.", "").replace(".default", "")] += 1
        return func(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that tensors made inside the mode keep alive (``now``) and their largest sum
    (``peak``): a storage counts from the op that made it until the last tensor the mode saw on it is
    collected. Views of storages made outside (weights, inputs) count nothing. CPU tensors only."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}  # storage address -> [bytes, tensors alive]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = [t for t in tree_leaves((args, kwargs)) if type(t) is torch.Tensor]
        seen = {t.untyped_storage().data_ptr() for t in ins}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if type(t) is not torch.Tensor or t.device.type != "cpu":
                continue
            key = t.untyped_storage().data_ptr()
            if key == 0 or (key in seen and key not in self.live):
                continue
            if key not in self.live:
                self.live[key] = [t.untyped_storage().nbytes(), 0]
                self.now += self.live[key][0]
                self.peak = max(self.peak, self.now)
            self.live[key][1] += 1
            weakref.finalize(t, self.drop, key)
        return out

    def drop(self, key) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]


class Region:
    """Ops, syncs and Python-level reads of every call of a function (summed), and the calls."""

    def __init__(self, live: LiveBytes | None = None):
        self.calls, self.ops, self.syncs, self.reads, self.seconds = 0, 0, collections.Counter(), 0, 0.0
        self.live, self.entry = live, 0  # bytes live (``live.now``) when the region was last entered

    def wrap(self, fn):
        from mmsink.tools.reads import DeviceReads

        def run(*a, **k):
            self.calls += 1
            if self.live is not None:
                self.entry = self.live.now
            t0 = time.perf_counter()
            with DeviceReads() as r, Counted() as c:
                out = fn(*a, **k)
            self.seconds += time.perf_counter() - t0
            self.ops += c.ops
            self.syncs.update(c.syncs)
            self.reads += r.total
            return out

        return run

    def per_call(self) -> dict:
        n = max(self.calls, 1)
        return dict(
            calls=self.calls,
            ops=self.ops / n,
            syncs=sum(self.syncs.values()) / n,
            reads=self.reads / n,
            ms=1e3 * self.seconds / n,
        )


MODES = {
    "none": None,
    "window2048": {"window": 2048, "sinks": 4},
    "int4": {"quant": "int4", "keep_sinks": True},
    "lfps512": {"sparse": "lfps", "topk": 512},
}


def cpu_counts(batches: list[int], modes: list[str], methods: list[str], new_tokens: int) -> list[dict]:
    """Prefill / fill / step counts per mode and batch on tiny-next-cpu (see the module docstring)."""
    import mmsink
    from mmsink.fast import clear
    from mmsink.fast import decode as fdec
    from mmsink.fast import generate as fgen
    from mmsink.kv import fast, fast_quant, fast_sparse
    from mmsink.tools.bench import bench_inputs, build

    torch.manual_seed(0)
    model = build("tiny-next-cpu", "cpu", torch.float32)
    model.generation_config.eos_token_id = None
    one, _ = bench_inputs(model, 1, 35, 29, "cpu", torch.float32)
    classes = [fdec.FastDecoder, fast.WindowDecoder, fast_quant.QuantDecoder, fast_sparse.SparseDecoder]
    rows = []
    for method in methods:
        for mode in modes:
            for b in batches:
                inputs = {k: v.repeat(b, *[1] * (v.dim() - 1)) for k, v in one.items()}
                clear(model)
                wrapped = method != "none" or MODES[mode] is not None
                if wrapped:
                    mmsink.wrap(
                        model,
                        kv=MODES[mode],
                        **({} if method == "none" else {"prune": method, "budget": 320}),
                    )
                live = LiveBytes()
                regions = {k: Region(live) for k in ("prefill", "fill", "step")}
                real = {
                    "prefill": fgen.prefill,
                    **{f"fill{i}": c.fill for i, c in enumerate(classes)},
                    **{f"step{i}": c.step for i, c in enumerate(classes)},
                }
                captures = []

                def stand_in(fn, captures=captures):
                    out = fn()
                    captures.append(1)
                    return out, fn

                saved_capture = fdec.capture_graph
                fdec.capture_graph = stand_in
                fgen.prefill = regions["prefill"].wrap(real["prefill"])
                for i, c in enumerate(classes):
                    c.fill = regions["fill"].wrap(real[f"fill{i}"])
                    c.step = regions["step"].wrap(real[f"step{i}"])
                try:
                    with torch.no_grad():
                        with live:  # the first call: the decoder's store is made in it too
                            mmsink.generate_fast(
                                model, max_new_tokens=new_tokens, graphs=False, compile=False, **inputs
                            )
                        first = {k: r.per_call() for k, r in regions.items()}
                        held = regions["fill"].entry
                        for _ in range(2):  # graphed path (stand-in capture): captured once per decoder?
                            mmsink.generate_fast(
                                model, max_new_tokens=new_tokens, graphs=True, compile=False, **inputs
                            )
                finally:
                    fdec.capture_graph = saved_capture
                    fgen.prefill = real["prefill"]
                    for i, c in enumerate(classes):
                        c.fill, c.step = real[f"fill{i}"], real[f"step{i}"]
                    if wrapped:
                        mmsink.unwrap(model)
                row = dict(method=method, mode=mode, batch=b, captures_over_2_graphed_calls=len(captures))
                row["peak_mib"] = live.peak / 2**20  # live bytes over prefill, fill and the steps
                row["held_at_fill_mib"] = held / 2**20  # what the prefill (and the store) left alive
                row.update({f"{k}_{m}": v for k, r in first.items() for m, v in r.items() if m != "calls"})
                row["steps"] = first["step"]["calls"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    clear(model)
    return rows


def markdown(res: dict) -> str:
    lines = [
        f"`{res['command']}`",
        "",
        f"{res['machine']}; torch {res['torch']}, transformers {res['transformers']}",
    ]
    lines += [
        "",
        "One decode step at LLaVA-NeXT-7B's shape (meta tensors, bf16; SDPA as one fused read; est. ms = "
        "bytes / 4.8 TB/s, a floor):",
        "",
        "| mode | batch | KV MiB / seq | ops | read GB | written GB | est. ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["step"]:
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['kv_mib_per_seq']:.0f} | {r['ops']} | {r['read_gb']:.1f} | "
            f"{r['written_gb']:.1f} | {r['est_ms']:.1f} |"
        )
    lines += [
        "",
        "tiny-next-cpu (6 layers, 2993-token prompt), per call: aten ops, sync ops, Python-level reads, "
        "CPU ms (shared machine: indicative only); captures: CUDA-graph captures (CPU stand-in) over two "
        "graphed calls; peak MiB: the most bytes live at once in the first call (tensors made in it: "
        "activations, caches, the decoder's store; not the weights); held MiB: live when ``fill`` starts:",
        "",
        "| method | mode | batch | prefill ops | prefill syncs | prefill reads | fill ops | fill syncs | "
        "step ops | step syncs | step reads | step ms | captures | peak MiB | held MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["cpu"]:
        lines.append(
            f"| {r['method']} | {r['mode']} | {r['batch']} | {r['prefill_ops']:.0f} | "
            f"{r['prefill_syncs']:.0f} | {r['prefill_reads']:.0f} | {r['fill_ops']:.0f} | "
            f"{r['fill_syncs']:.0f} | {r['step_ops']:.0f} | "
            f"{r['step_syncs']:.0f} | {r['step_reads']:.0f} | {r['step_ms']:.1f} | "
            f"{r['captures_over_2_graphed_calls']} | {r.get('peak_mib', float('nan')):.1f} | "
            f"{r.get('held_at_fill_mib', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--step-batches", default="16")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--modes", default="none,window2048,int4,lfps512")
    ap.add_argument("--methods", default="none,fastv")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--skip-cpu", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    res = dict(
        command="python -m evals.kv_serving_cpu " + shlex.join(sys.argv[1:] if argv is None else argv),
        machine="CPU, 2 cores, shared with other jobs",
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    res["step"] = [r for b in a.step_batches.split(",") if b for r in step_costs(int(b))]
    res["cpu"] = []
    if not a.skip_cpu:
        batches = [int(b) for b in a.batches.split(",")]
        res["cpu"] = cpu_counts(batches, a.modes.split(","), a.methods.split(","), a.new_tokens)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_serving_cpu.json").write_text(json.dumps(res, indent=1))
    (out / "kv_serving_cpu.md").write_text(markdown(res) + "\n")
    print(markdown(res))


if __name__ == "__main__":
    main()
