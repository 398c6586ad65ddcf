"""Time of the vision tower quantized to W8A8 against bf16, with and without RegCache's prefix (issue 18).

The tower is CLIP ViT-L/14-336 (24 blocks, width 1024, 16 heads, MLP 4096, 577 tokens an image) inside a
LLaVA model with random weights (speed does not depend on them) and a one-layer stub LM; what is timed is
``model.model.get_image_features`` (tower + projector). Shapes: LLaVA-1.5 (one 336 px image per request,
1 and 16 images) and LLaVA-NeXT (5 tiles of 336 px per image, 1 and 8 images: 5 and 40 tower inputs; NeXT's
unpadding and newline tokens after the projector are left out). Rows per shape: bf16, bf16 + RegCache
prefix (``--tau`` random registers on the blocks from ``--start``, through ``mmsink.wrap``), and each int8
W8A8 backend of ``--backend`` (comma-separated) alone and + prefix:

- ``torchao``: torchao's ``Int8DynamicActivationInt8WeightConfig`` (per-token dynamic activations,
  per-channel weights, ``torch._int_mm`` underneath); eager it pays a tensor repr per linear (see
  evals/results/regcache/h200/README.md), compiled it is what torchao intends;
- ``int_mm``, ``int_mm_fused``, ``triton``: evals/int8_linear.py's forms ``eager`` (plain torch ops around
  ``_int_mm``), ``fused`` (Triton quantizer + ``_int_mm`` + Triton rescale) and ``triton`` (Triton
  quantizer + Triton int8 GEMM with the rescale in its epilogue).

``auto``: torchao when it imports, else int_mm. Each rep runs every row once in turn (alternated), timed
with CUDA events; medians and quartiles over reps. ``--compile`` compiles each tower block of every row
(bf16 and int8 alike; dynamic shapes, so one graph serves every batch past 1). ``--gemm`` first times one
linear of each tower shape op by op (bf16, ``_int_mm`` in both weight layouts, each quantizer / rescale,
each form, torchao's linear and the repr it pays).

On the H200 (no network there: torchao comes as a wheel in the ignored folder ``wheels/torchao``;
torchao-0.17.0-cp310-abi3 installs on 3.12 and is built against torch 2.11):

    run(command='S=$(mktemp -d); python -m pip install -q --no-index --no-deps --target $S
        wheels/torchao/*.whl; export PYTHONPATH=$PWD:$S; python -m evals.regcache_speed --backend
        torchao,int_mm,int_mm_fused,triton --gemm --reps 10 --out $OUT/eager; python -m evals.regcache_speed
        --compile --backend torchao,int_mm,triton --out $OUT/compile', carry=["wheels/torchao"])

(evals/results/regcache/h200/README.md has the same with a timeout on each stage.)

Results are written after each shape, so a run cut short keeps what it timed. ``--tiny``: CPU smoke run
on a 64-wide, 2-block tower with 56 px images (checks the code paths, not speed).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

try:
    import triton
except ImportError:
    triton = None

import mmsink
from mmsink.sinks.regcache import RegCache

from .int8_linear import quantize_linears

SHAPES = {
    "llava-1.5 b1": 1,
    "llava-1.5 b16": 16,
    "llava-next b1 (5 tiles)": 5,
    "llava-next b8 (40 tiles)": 40,
}


BACKENDS = ("torchao", "int_mm", "int_mm_fused", "triton")
FORM = {"int_mm": "eager", "int_mm_fused": "fused", "triton": "triton"}


def quantize_tower(tower: nn.Module, backend: str) -> str:
    """The tower's linears to W8A8 in place; returns what ran."""
    if backend == "torchao":
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        # set_inductor_config=False: torchao's recommended inductor settings (coordinate descent tuning) are
        # global, would slow every compile and change the bf16 rows too
        quantize_(tower, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        return f"torchao {torchao.__version__} Int8DynamicActivationInt8WeightConfig (v1, PlainLayout)"
    quantize_linears(tower, FORM[backend])
    return f"Int8Linear form {FORM[backend]!r} (evals/int8_linear.py)"


def form_problem(backend: str, device: str) -> str | None:
    """None when the backend's Int8Linear form runs here and agrees with the torch-op form on one linear."""
    if backend not in FORM or FORM[backend] == "eager":
        return None
    from .int8_linear import Int8Linear

    torch.manual_seed(0)
    lin = nn.Linear(256, 512).to(device, torch.bfloat16)
    x = torch.randn(600, 256, device=device, dtype=torch.bfloat16)
    try:
        q = Int8Linear(lin, FORM[backend])
        y, ref = q(x).float(), q._ops(x).float()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"[:300]
    err = ((y - ref).norm() / ref.norm()).item()
    return None if err < 1e-2 else f"relative error {err:.3g} against the torch-op form"


def backends_of(spec: str) -> list[str]:
    names = [b.strip() for b in spec.split(",") if b.strip()]
    if names == ["auto"]:
        try:
            import torchao  # noqa: F401

            names = ["torchao"]
        except ImportError:
            names = ["int_mm"]
    bad = [b for b in names if b not in BACKENDS]
    if bad or not names:
        raise SystemExit(f"--backend: comma-separated names from {BACKENDS} (or auto), got {spec!r}")
    return names


def build(tiny: bool, device: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        vision = CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56
        )
    else:  # openai/clip-vit-large-patch14-336
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        )
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    cfg = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2, image_token_id=3)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).to(device, torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    return model


def registers(model, tau: int, start: int) -> RegCache:
    """Random register keys / values, on the tower's device and dtype as curated ones are (on the CPU, each
    block's prefix would be a blocking host-to-device copy inside the timed call)."""
    v = model.config.vision_config
    heads, hd = v.num_attention_heads, v.hidden_size // v.num_attention_heads
    g = torch.Generator().manual_seed(1)
    dev = dict(device=model.device, dtype=model.dtype)
    keys = {i: torch.randn(heads, hd, generator=g).to(**dev) for i in range(start, v.num_hidden_layers)}
    values = {i: torch.randn(heads, hd, generator=g).to(**dev) for i in range(start, v.num_hidden_layers)}
    return RegCache(keys, values, tau, start, start)


def timer(device: str):
    if device == "cuda":

        def run(fn):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b)

    else:

        def run(fn):
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)

    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a 64-wide tower")
    p.add_argument(
        "--backend", default="auto", help=f"comma-separated, from {BACKENDS}; auto: torchao if any"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each tower block (every row)")
    p.add_argument("--gemm", action="store_true", help="also time one linear of each kind, op by op")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tau", type=int, default=4)
    p.add_argument("--start", type=int, default=None, help="first prefixed block (default: a third in)")
    p.add_argument("--out", default="evals/results/regcache_speed")
    a = p.parse_args(argv)
    if a.reps < 2:
        raise SystemExit(f"--reps must be at least 2 (quartiles need two times), got {a.reps}")
    backends = backends_of(a.backend)
    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on the CPU")
    base = build(a.tiny, device)
    models, kinds = {"bf16": base}, {}
    for b in list(backends):
        problem = form_problem(b, device)
        if problem:  # a kernel that fails to build or disagrees on the GPU costs its rows, not the run
            print(f"dropping backend {b}: {problem}", flush=True)
            kinds[b] = f"dropped: {problem}"
            backends.remove(b)
            continue
        models[b] = copy.deepcopy(base)
        kinds[b] = quantize_tower(models[b].model.vision_tower, b)
        if a.compile and b in ("int_mm", "int_mm_fused"):
            kinds[b] += "; compiled: the torch ops, fused by inductor around an extern _int_mm"
        elif a.compile and b == "triton":
            kinds[b] += "; compiled: the rest of the block, the Triton kernels behind a graph break"
    rows = [r for m in models for r in (m, m + "+regcache")]
    layers = base.config.vision_config.num_hidden_layers
    rc = registers(base, a.tau, layers // 3 if a.start is None else a.start)
    if a.compile:  # shapes x prefix on / off x towers: more variants than dynamo's default 8
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
    for m in models.values():
        mmsink.wrap(m, regcache=rc)
        if a.compile:
            tower = m.model.vision_tower
            for layer in getattr(tower, "vision_model", tower).encoder.layers:
                layer.compile(dynamic=True)  # one graph for every batch size past 1: fewer compiles
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": getattr(triton, "__version__", None),
        "int8_backends": kinds,
        "compile": a.compile,
        "tower": "tiny 64-wide, 2 blocks" if a.tiny else "CLIP ViT-L/14-336, random weights, bf16, SDPA",
        "tau": a.tau,
        "prefixed_blocks": f"{rc.start}..{layers - 1}",
        "reps": a.reps,
        "command": "python -m evals.regcache_speed " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    side = base.config.vision_config.image_size
    clock, results, gemm = timer(device), {}, {}
    if a.gemm:
        v = base.config.vision_config
        gemm = gemm_table(base, backends, v.image_size // v.patch_size, device)
        write(Path(a.out), meta, results, gemm)
    for shape, n in SHAPES.items():
        pv = torch.randn(n, 3, side, side, device=device, dtype=torch.bfloat16)
        calls = {row: call(models[row.split("+")[0]], pv, "+regcache" in row) for row in rows}
        t0 = time.perf_counter()
        with torch.inference_mode():
            feats = {row: calls[row]() for row in rows}
            for _ in range(a.warmup):
                for row in rows:
                    calls[row]()
            times = {row: [] for row in rows}
            for _ in range(a.reps):
                for row in rows:
                    times[row].append(clock(calls[row]))
        results[shape] = summarize(times, feats, n)
        on, off = torch.cat(list(feats["bf16+regcache"])).float(), torch.cat(list(feats["bf16"])).float()
        if torch.equal(on, off):
            raise SystemExit("the RegCache prefix did not change the features: it is not installed")
        took = time.perf_counter() - t0
        print(shape, f"({took:.0f} s)", {r: results[shape][r]["median_ms"] for r in rows}, flush=True)
        write(Path(a.out), meta, results, gemm)  # after each shape: a run cut short keeps what it timed


def call(model, pv, prefix: bool):
    def fn():
        if prefix:
            return model.model.get_image_features(pixel_values=pv).pooler_output
        with mmsink.disabled(model):
            return model.model.get_image_features(pixel_values=pv).pooler_output

    return fn


def summarize(times: dict, feats: dict, n: int) -> dict:
    out = {}
    for row, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        f = torch.cat(list(feats[row])).float()
        ref = torch.cat(list(feats["bf16+regcache" if "+regcache" in row else "bf16"])).float()
        out[row] = {
            "median_ms": round(statistics.median(ts), 3),
            "q1_ms": round(q[0], 3),
            "q3_ms": round(q[2], 3),
            "images_per_s": round(1e3 * n / statistics.median(ts), 1),
            "rel_error_vs_bf16": ((f - ref).pow(2).mean() / ref.pow(2).mean()).item(),
        }
    bf16 = out["bf16"]["median_ms"]
    for row in out:
        out[row]["vs_bf16"] = round(out[row]["median_ms"] / bf16, 3)
    return out


def gemm_table(model, backends, side: int, device: str, iters: int = 20) -> dict:
    """One linear of each tower shape (q/k/v/out, fc1, fc2) at each bench shape's token count, op by op:
    where an int8 linear's time goes. Times are per call, the median of 5 loops of ``iters`` calls."""
    from . import int8_linear as il

    v = model.config.vision_config
    h, inter = v.hidden_size, v.intermediate_size
    tokens = side * side + 1
    clock = timer(device)
    torchao_lin = None
    out = {}
    for (n_out, k_in), name in (((h, h), "q/k/v/out"), ((inter, h), "fc1"), ((h, inter), "fc2")):
        torch.manual_seed(0)
        lin = nn.Linear(k_in, n_out).to(device, torch.bfloat16)
        forms = {f: il.Int8Linear(lin, f) for f in il.FORMS}
        if "torchao" in backends:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            torchao_lin = copy.deepcopy(lin)
            quantize_(torchao_lin, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        for shape, n in SHAPES.items():
            m = n * tokens
            x = torch.randn(m, k_in, device=device, dtype=torch.bfloat16)
            ops = linear_ops(x, lin, forms, torchao_lin, device)
            row = {}
            with torch.inference_mode():
                for op, (fn, flops) in ops.items():
                    try:
                        for _ in range(3):
                            fn()
                    except Exception as e:  # noqa: BLE001 - one op failing on the GPU should not cost the table
                        row[op] = {"us": None, "error": f"{type(e).__name__}: {e}"[:300]}
                        continue

                    def loop(fn=fn):
                        for _ in range(iters):
                            fn()

                    us = 1e3 * statistics.median(clock(loop) for _ in range(5)) / iters
                    row[op] = {"us": round(us, 1)}
                    if flops:
                        row[op]["tops"] = round(2 * m * n_out * k_in / us / 1e6, 1)
            out[f"{name} {k_in}->{n_out}, M={m} ({shape})"] = row
            print("gemm", name, shape, {op: r["us"] for op, r in row.items()}, flush=True)
    return out


def linear_ops(x, lin, forms, torchao_lin, device) -> dict:
    """name -> (call, counts as a GEMM) for one input ``x`` to the linear ``lin``."""
    import torch.nn.functional as F

    from . import int8_linear as il

    wq, ws = forms["eager"].wq, forms["eager"].ws
    wq_rowmajor = wq.t().contiguous()
    xq, xs = il.quantize_rows_ref(x)
    acc = torch._int_mm(xq, wq.t())
    ops = {
        "bf16 F.linear": (lambda: F.linear(x, lin.weight, lin.bias), True),
        "_int_mm, W column-major (ours)": (lambda: torch._int_mm(xq, wq.t()), True),
        "_int_mm, W row-major (torchao's layout)": (lambda: torch._int_mm(xq, wq_rowmajor), True),
        "W .contiguous() copy (torchao, per call)": (lambda: wq.t().contiguous(), False),
        "quantize, torch ops (eager form)": (lambda: q_eager(x), False),
        "Int8Linear eager": (lambda: forms["eager"](x), True),
        "Int8Linear fused": (lambda: forms["fused"](x), True),
        "Int8Linear triton": (lambda: forms["triton"](x), True),
    }
    if device == "cuda" and il.triton is not None:
        ops["quantize, Triton kernel"] = (lambda: il.quantize_rows(x), False)
        ops["rescale, Triton kernel"] = (lambda: il.rescale(acc, xs, ws, lin.bias, x.dtype), False)
        ops["Triton GEMM + rescale"] = (lambda: il.gemm_rescale(xq, xs, wq, ws, lin.bias, x.dtype), True)
    if torchao_lin is not None:
        ops["torchao linear (eager)"] = (lambda: torchao_lin(x), True)
        ops["tensor repr (torchao's eager FakeTensor check)"] = (lambda: "FakeTensor" in xq.__repr__(), False)
    return ops


def q_eager(x):
    xs = x.abs().amax(1, keepdim=True).float().clamp_min(1e-8) / 127
    return (x.float() / xs).round().clamp(-127, 127).to(torch.int8), xs


def write(out: Path, meta: dict, results: dict, gemm: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    blob = {"meta": meta, "results": results, "gemm": gemm}
    (out / "regcache_speed.json").write_text(json.dumps(blob, indent=1))
    lines = [
        f"# Vision tower W8A8 vs bf16, with and without RegCache ({meta['device']})",
        "",
        f"{meta['tower']}; compile: {meta['compile']}; registers: tau {meta['tau']} on blocks "
        f"{meta['prefixed_blocks']}; median of {meta['reps']} alternated reps; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, triton {meta['triton']}.",
        "",
        *[f"- {b}: {k}" for b, k in meta["int8_backends"].items()],
        "",
        "| shape (tower inputs) | row | median ms | q1-q3 ms | images/s | time / bf16 | rel. sq. error |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, rows in results.items():
        for row, r in rows.items():
            lines.append(
                f"| {shape} | {row} | {r['median_ms']} | {r['q1_ms']}-{r['q3_ms']} | {r['images_per_s']} | "
                f"{r['vs_bf16']} | {r['rel_error_vs_bf16']:.2g} |"
            )
    lines += [
        "",
        "rel. sq. error: of the features against the bf16 row with the same prefix (random weights: a check",
        "that the int8 path computes the same function, not an accuracy figure).",
        "",
        f"Command: `{meta['command']}`",
    ]
    if gemm:
        lines += ["", "## One linear, op by op (us per call; TOPS = 2MNK / time)", ""]
        for where, ops in gemm.items():
            lines += [f"### {where}", "", "| op | us | TOPS |", "|---|---|---|"]
            lines += [
                f"| {op} | {r['us'] if r['us'] is not None else r['error']} | {r.get('tops', '')} |"
                for op, r in ops.items()
            ] + [""]
    (out / "regcache_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
