"""The vision towers' self-attention on one GPU (issue 20): each SDPA backend forced in turn, on q / k / v
laid out as the tower hands them over, on contiguous copies, and with the head dim zero-padded.

    python evals/tower_attention_speed.py --out evals/results/tower_attention   # one GPU
    python evals/tower_attention_speed.py --tiny --out /tmp/ta                  # CPU: checks the code path

Shapes: Qwen2-VL-7B's tower block over one 1400x1400 image (10,000 patches, 16 heads of 80, not causal;
Qwen2.5-VL-7B's full-attention blocks have the same shape and layout, so one row stands for both),
Qwen2.5-VL-7B's windowed blocks (windows of 64 patches, as a batch of 156), CLIP-L/336 in LLaVA-NeXT-7B
(5 tiles of 577) and in LLaVA-1.5-7B (1 tile).

Layouts: ``tower`` builds q / k / v as transformers 5.17 does. Qwen (``Qwen2VLVisionAttention.forward``):
``qkv(x)`` as one [seq, 3 * heads * d] tensor, ``reshape(seq, 3, heads, d).permute(1, 0, 2, 3).unbind(0)``,
the rotary in fp32 cast back (which makes q and k contiguous [seq, heads, d]; v stays a view of the qkv
output), then ``transpose(0, 1).unsqueeze(0)``. CLIP: three [b, seq, heads * d] projections, each
``view(b, seq, heads, d).transpose(1, 2)``. ``contiguous``: ``.contiguous()`` copies of those (the copy
timed on its own). ``pad N``: the head dim zero-padded to N (the next multiple of 32 and of 64, where the
head dim is not one already) and the output sliced back, the scale kept at the real head dim's: zeros
added to q and k leave every score unchanged and v's zero columns are sliced off, so the output is the
same up to the kernel's rounding; the script records that check (each padded output against the same
backend's unpadded one).

Each variant runs ``--inner`` calls (default: enough for ~1 ms of work) captured as one CUDA graph
(eager with CUDA events where capture fails, noted), warmed first, replayed ``--reps`` times alternated
variant by variant; ms per call is the median. TFLOP/s: 4 * b * h * n^2 * d per call with the real head
dim. Max abs diff: each output against the default SDPA call on the tower layout (the model's call).
Which backend the default call picks: the ``aten::_scaled_dot_product_*`` op in a ``torch.profiler``
trace of one default call per layout (plus the GPU kernels' names), cross-checked by which forced
backends' outputs are bitwise equal to the default's. A backend that raises is reported n/a with the
reason SDPA gives. JSON + Markdown to ``--out``, rewritten after each shape.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

# (name, batch, heads, tokens, head dim, how the tower builds q / k / v)
SHAPES = [
    ("qwen2-vl-7b block / qwen2.5-vl-7b full-attention block", 1, 16, 10000, 80, "qwen"),
    ("qwen2.5-vl-7b windowed block (156 windows of 64)", 156, 16, 64, 80, "qwen"),
    ("llava-next-7b clip-l/336 (5 tiles)", 5, 16, 577, 64, "clip"),
    ("llava-1.5-7b clip-l/336", 1, 16, 577, 64, "clip"),
]
TINY = [
    ("tiny qwen", 1, 2, 40, 20, "qwen"),
    ("tiny qwen windows", 5, 2, 8, 20, "qwen"),
    ("tiny clip", 2, 2, 17, 16, "clip"),
]
BACKENDS = {  # default: no choice made (what the model's SDPA call gets)
    "default": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
SPLIT = "default, one call per window (transformers' sdpa loop)"


def pads(d):
    """Padded head dims worth trying: the next multiples of 32 and 64 above ``d``."""
    return sorted({m * math.ceil(d / m) for m in (32, 64)} - {d})


def tower_qkv(b, h, n, d, kind, dev, dtype):
    """q, k, v as [b, h, n, d] with the strides the tower gives them."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if kind == "clip":
        return [
            torch.randn(b, n, h * d, generator=g).to(dev, dtype).view(b, n, h, d).transpose(1, 2)
            for _ in range(3)
        ]
    seq = b * n  # Qwen2.5's windows lie one after another along the sequence
    qkv = torch.randn(seq, 3 * h * d, generator=g).to(dev, dtype)
    q, k, v = qkv.reshape(seq, 3, h, d).permute(1, 0, 2, 3).unbind(0)
    angle = torch.rand(seq, d // 2, generator=g).repeat(1, 2) * 6.3
    q, k = apply_rotary_pos_emb_vision(q, k, angle.cos().to(dev), angle.sin().to(dev))
    if b == 1:  # exactly the module's view (its batch stride too)
        return [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
    return [x.reshape(b, n, h, d).transpose(1, 2) for x in (q, k, v)]


def padded(x, width):
    return F.pad(x, (0, width - x.shape[-1])).contiguous()


def attention(backend, q, k, v, scale, d):
    def call():
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out[..., :d] if out.shape[-1] != d else out

    return call


def per_window(q, k, v, scale):
    """Qwen2.5-VL's windowed block under transformers' sdpa path: one SDPA call per window."""
    b, h, n, d = q.shape
    one = [x.transpose(1, 2).reshape(1, b * n, h, d).transpose(1, 2) for x in (q, k, v)]  # views
    splits = [x.split(n, dim=2) for x in one]

    def call():
        outs = [F.scaled_dot_product_attention(a, b_, c, scale=scale) for a, b_, c in zip(*splits)]
        return torch.cat(outs, dim=2).view(h, b, n, d).transpose(0, 1)

    return call


def first_line(e, caught):
    """SDPA's reason: its warnings say why each kernel was not used; the error itself is generic."""
    why = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    return "; ".join(dict.fromkeys(why + [str(e).strip().splitlines()[0]]))[:400]


def try_call(fn):
    """(output, None) or (None, reason)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(), None
        except Exception as e:  # noqa: BLE001 -- any backend refusal is a result, not a crash
            return None, first_line(e, caught)


def timer(fn, dev, inner, graph=True):
    """(callable returning ms of one ``fn()``, how it is timed); ``fn`` warmed first."""
    if dev != "cuda":
        fn()

        def run_cpu():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - t0) * 1e3 / inner

        return run_cpu, "wall clock"
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    how, step = "eager, CUDA events", fn
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(inner):
                    fn()
            how, step = "CUDA graph", g.replay
        except Exception as e:  # noqa: BLE001 -- fall back to eager timing, noted in the results
            torch.cuda.synchronize()
            how = f"eager, CUDA events (graph capture failed: {str(e).splitlines()[0][:120]})"

    def run():
        a.record()
        if step is fn:
            for _ in range(inner):
                fn()
        else:
            step()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / inner

    return run, how


def default_pick(fn, dev):
    """The SDPA ops (and GPU kernels) one call of ``fn`` runs, from a profiler trace."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=acts) as prof:
            fn()
            if dev == "cuda":
                torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 -- the pick is then unknown, noted
        return dict(ops=[], kernels=[], error=str(e).splitlines()[0][:200])
    ops, kernels = [], []
    for ev in prof.events():
        if ev.name.startswith(
            ("aten::_scaled_dot_product", "aten::_flash", "aten::_efficient", "aten::_cudnn")
        ):
            ops.append(ev.name)
        elif ev.device_type == torch.autograd.DeviceType.CUDA and not ev.name.startswith("Memcpy"):
            kernels.append(ev.name[:160])
    return dict(ops=list(dict.fromkeys(ops)), kernels=list(dict.fromkeys(kernels)))


def flags():
    out = {}
    for name in (
        "flash_sdp_enabled",
        "mem_efficient_sdp_enabled",
        "cudnn_sdp_enabled",
        "math_sdp_enabled",
        "fp16_bf16_reduction_math_sdp_allowed",
        "is_flash_attention_available",
    ):
        fn = getattr(torch.backends.cuda, name, None)
        out[name] = fn() if fn is not None else "absent"
    m = torch.backends.cuda.matmul
    out["matmul.allow_tf32"] = m.allow_tf32
    out["matmul.allow_bf16_reduced_precision_reduction"] = m.allow_bf16_reduced_precision_reduction
    out["cudnn.enabled"] = torch.backends.cudnn.enabled
    out["cudnn.version"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    return out


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def measure(shape, dev, dtype, reps, inner):
    name, b, h, n, d, kind = shape
    flop = 4 * b * h * n * n * d
    if inner is None:
        inner = max(1, min(20, round(2e11 / flop))) if dev == "cuda" else 1
    scale = d**-0.5
    tower = tower_qkv(b, h, n, d, kind, dev, dtype)
    layouts = {"tower": tower, "contiguous": [x.contiguous() for x in tower]}
    for p in pads(d):
        layouts[f"pad {p}"] = [padded(x, p) for x in tower]
    prep = {"contiguous": lambda: [x.contiguous() for x in tower]}
    for p in pads(d):
        prep[f"pad {p}"] = lambda p=p: [padded(x, p) for x in tower]

    calls = {
        f"{bk} / {lay}": attention(backend, *qkv, scale, d)
        for lay, qkv in layouts.items()
        for bk, backend in BACKENDS.items()
    }
    if b > 1 and kind == "qwen":
        calls[SPLIT] = per_window(*tower, scale)
    outs, rows = {}, {}
    for key, fn in calls.items():
        out, why = try_call(fn)
        sync(dev)
        if why is not None:
            rows[key] = dict(na=why)
            print(f"  {key}: n/a ({why[:150]})", flush=True)
        else:
            outs[key] = out
    ref = outs["default / tower"].float()

    runs = {}
    for key in outs:
        runs[key] = timer(calls[key], dev, inner)
    if SPLIT in outs:
        runs[SPLIT + ", eager"] = timer(calls[SPLIT], dev, inner, graph=False)
    for key, fn in prep.items():
        runs["prep " + key] = timer(fn, dev, inner)
    times = {key: [] for key in runs}
    for _ in range(reps):
        for key, (run, _how) in runs.items():
            times[key].append(run())
    ms = {key: statistics.median(t) for key, t in times.items()}
    prep_ms = {key: round(ms.pop("prep " + key), 4) for key in prep}

    for key, out in outs.items():
        rows[key] = dict(
            ms=round(ms[key], 4),
            tflops=round(flop / ms[key] / 1e9, 4),
            max_diff=float((out.float() - ref).abs().max()),
            timing=runs[key][1],
        )
    if SPLIT in outs:
        key = SPLIT + ", eager"
        rows[key] = dict(rows[SPLIT], ms=round(ms[key], 4), tflops=round(flop / ms[key] / 1e9, 4))
        rows[key]["timing"] = runs[key][1]

    pad_check = {}
    for bk in BACKENDS:
        base = outs.get(f"{bk} / contiguous")
        for p in pads(d):
            key = f"{bk} / pad {p}"
            if base is None or key not in outs:
                continue
            diff = float((outs[key].float() - base.float()).abs().max())
            pad_check[key] = dict(
                against=f"{bk} / contiguous", max_diff=diff, equal=torch.equal(outs[key], base)
            )
    fused = {bk: outs[f"{bk} / tower"] for bk in BACKENDS if bk != "default" and f"{bk} / tower" in outs}
    picks = {lay: default_pick(calls[f"default / {lay}"], dev) for lay in layouts}
    return dict(
        shape=name, batch=b, heads=h, tokens=n, head_dim=d, layout=kind, dtype=str(dtype).split(".")[-1],
        flops_per_call=flop, inner=inner, tower_strides=[list(x.stride()) for x in tower],
        prep_ms=prep_ms, variants=rows, pad_check=pad_check,
        default_pick=picks,
        bitwise_equal_to_default=[bk for bk, o in fused.items() if torch.equal(o, outs["default / tower"])],
    )  # fmt: skip


def short(pick):
    ops = [o.replace("aten::_scaled_dot_product_", "") for o in pick.get("ops", [])]
    return ", ".join(ops) or pick.get("error", "?")


def table(res) -> str:
    out = [f"Command: `{res['command']}`  ", f"Machine: {res['machine']}; {res['versions']}  "]
    out.append(f"torch.backends flags: {res['flags']}\n")
    clock = "wall clock" if res["machine"].startswith("cpu") else "CUDA events"
    out.append(
        f"Vision-tower self-attention (no mask, not causal), ms per call: median of {res['reps']} reps "
        f"({clock} around `inner` calls, as one CUDA graph where the timing column says so), variants "
        "alternated. `prep ms`: the copy to contiguous / the padding of q, k and v from the tower layout, "
        "timed alone. TFLOP/s: 4 b h n^2 d (real d) over the attention ms. Max diff: against "
        "`default / tower` (the model's call). Padded rows: output sliced to the real head dim, scale "
        "the real head dim's (zero columns in q and k leave the scores unchanged).\n"
    )
    for r in res["shapes"]:
        dims = f"batch {r['batch']}, {r['heads']} heads, {r['tokens']} tokens, head dim {r['head_dim']}"
        out.append(
            f"\n**{r['shape']}** ({dims}, {r['dtype']}, {r['flops_per_call'] / 1e9:.2f} GFLOP a call)\n"
        )
        picks = "; ".join(f"{lay}: {short(p)}" for lay, p in r["default_pick"].items())
        kern = r["default_pick"]["tower"].get("kernels", [])
        out.append(f"Default SDPA picks (profiler op): {picks}.  ")
        if kern:
            out.append(f"Its GPU kernels on the tower layout: `{'`, `'.join(kern[:3])}`.  ")
        same = ", ".join(r["bitwise_equal_to_default"]) or "none"
        out.append(f"Forced backends bitwise equal to the default (tower layout): {same}.\n")
        base = r["variants"]["default / tower"]["ms"]
        out.append(
            "| variant | attention ms | prep ms | total ms | vs default / tower | TFLOP/s | max abs diff | "
            "timing |\n|---|---|---|---|---|---|---|---|"
        )
        ok = {k: v for k, v in r["variants"].items() if "ms" in v}
        for key, v in sorted(ok.items(), key=lambda kv: kv[1]["ms"]):
            lay = key.split(" / ")[-1] if " / " in key else "tower"
            prep = r["prep_ms"].get(lay, 0.0)
            total = v["ms"] + prep
            out.append(
                f"| {key} | {v['ms']:.4f} | {prep:.4f} | {total:.4f} | {total / base:.3f} | "
                f"{v['tflops']:.4g} | {v['max_diff']:.3g} | {v['timing']} |"
            )
        for key, v in r["variants"].items():
            if "na" in v:
                out.append(f"| {key} | n/a | | | | | | {v['na'][:200]} |")
        if r["pad_check"]:
            out.append("\nPadded against unpadded (same backend, contiguous): ")
            out.append(
                "; ".join(
                    f"{k}: max diff {c['max_diff']:.3g}{' (bitwise equal)' if c['equal'] else ''}"
                    for k, c in r["pad_check"].items()
                )
                + "."
            )
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=None, help="default 20; --tiny 3")
    ap.add_argument("--inner", type=int, default=None, help="calls per timed sample (default: ~1 ms of work)")
    args = ap.parse_args(argv)
    dev = "cpu" if args.tiny else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("tower_attention_speed: needs CUDA (or --tiny)")
    reps = args.reps or (3 if args.tiny else 20)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    if dev == "cuda":
        versions += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    res = dict(
        command="python " + " ".join(sys.argv),
        machine=torch.cuda.get_device_name() if dev == "cuda" else cpu,
        versions=versions, flags=flags(), reps=reps, shapes=[],
    )  # fmt: skip
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for shape in TINY if args.tiny else SHAPES:
        print(f"[tower_attention_speed] {shape[0]}", flush=True)
        with torch.no_grad():
            res["shapes"].append(measure(shape, dev, dtype, reps, args.inner))
        (out / "tower_attention_speed.json").write_text(json.dumps(res, indent=1))
        (out / "tower_attention_speed.md").write_text(table(res))
        print(table(dict(res, shapes=res["shapes"][-1:])), flush=True)


if __name__ == "__main__":
    main()
