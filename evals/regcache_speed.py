"""Time of the vision tower quantized to W8A8 against bf16, with and without RegCache's prefix (issue 18).

The tower is CLIP ViT-L/14-336 (24 blocks, width 1024, 16 heads, MLP 4096, 577 tokens an image) inside a
LLaVA model with random weights (speed does not depend on them) and a one-layer stub LM; what is timed is
``model.model.get_image_features`` (tower + projector). Shapes: LLaVA-1.5 (one 336 px image per request,
1 and 16 images) and LLaVA-NeXT (5 tiles of 336 px per image, 1 and 8 images: 5 and 40 tower inputs; NeXT's
unpadding and newline tokens after the projector are left out). Rows per shape: bf16, bf16 + RegCache
prefix (``--tau`` random registers on the blocks from ``--start``, through ``mmsink.wrap``), int8 W8A8 and
int8 + prefix. int8: torchao's ``Int8DynamicActivationInt8WeightConfig`` (per-token dynamic activations,
per-channel weights, ``torch._int_mm`` underneath) when torchao imports, else the plain ``torch._int_mm``
linear below (same scheme); ``--backend`` forces one, the JSON's ``int8_backend`` says which ran. Each rep
runs every row once in turn (alternated), timed with CUDA events; medians and quartiles over reps.

On the H200 (no network there: torchao comes as a wheel in the ignored folder ``wheels/torchao``):

    pip download torchao==0.17.0 --no-deps -d wheels/torchao
    # torchao-0.17.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl: abi3 from CPython 3.10,
    # so it installs on 3.12; built against torch 2.11 (its __init__ loads its C++ ops from torch 2.11 on)
    run(command='S=$(mktemp -d); python -m pip install -q --no-index --no-deps --target $S
        wheels/torchao/*.whl; PYTHONPATH=$PWD:$S python -m evals.regcache_speed --out $OUT',
        carry=["wheels/torchao"])

Expected: ~2-4 min (model build, 4 shapes x 4 rows x (3 warm-up + 20 reps)). ``--compile`` compiles each
tower block (torch.compile; torchao's int8 path is meant to run compiled): a second run, a few minutes more.
``--tiny``: CPU smoke run on a 64-wide, 2-block tower with 56 px images (checks the code paths, not speed).
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
from torch import nn

import mmsink
from mmsink.sinks.regcache import RegCache

SHAPES = {
    "llava-1.5 b1": 1,
    "llava-1.5 b16": 16,
    "llava-next b1 (5 tiles)": 5,
    "llava-next b8 (40 tiles)": 40,
}
ROWS = ("bf16", "bf16+regcache", "int8", "int8+regcache")


class Int8Linear(nn.Module):
    """W8A8 by hand: int8 weights per output channel (symmetric), activations per token quantized on the
    fly, ``torch._int_mm`` (int32 accumulation), rescaled to the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-8) / 127
        self.register_buffer("wq", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("ws", scale)
        self.bias = linear.bias

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        xs = rows.abs().amax(1, keepdim=True).float().clamp_min(1e-8) / 127
        xq = (rows.float() / xs).round().clamp(-127, 127).to(torch.int8)
        y = (torch._int_mm(xq, self.wq.t()).float() * xs * self.ws).to(x.dtype)
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], -1)


def quantize_tower(tower: nn.Module, backend: str) -> str:
    """The tower's linears to W8A8 in place; returns the backend used."""
    if backend in ("auto", "torchao"):
        try:
            import torchao
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError:
            if backend == "torchao":
                raise
        else:
            quantize_(tower, Int8DynamicActivationInt8WeightConfig())
            return f"torchao {torchao.__version__} Int8DynamicActivationInt8WeightConfig"
    for mod in list(tower.modules()):
        for child, lin in list(mod.named_children()):
            if isinstance(lin, nn.Linear):
                setattr(mod, child, Int8Linear(lin))
    return "torch._int_mm (Int8Linear in evals/regcache_speed.py)"


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
    v = model.config.vision_config
    heads, hd = v.num_attention_heads, v.hidden_size // v.num_attention_heads
    g = torch.Generator().manual_seed(1)
    keys = {i: torch.randn(heads, hd, generator=g) for i in range(start, v.num_hidden_layers)}
    values = {i: torch.randn(heads, hd, generator=g) for i in range(start, v.num_hidden_layers)}
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
    p.add_argument("--backend", choices=("auto", "torchao", "int_mm"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile each tower block")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tau", type=int, default=4)
    p.add_argument("--start", type=int, default=None, help="first prefixed block (default: a third in)")
    p.add_argument("--out", default="evals/results/regcache_speed")
    a = p.parse_args(argv)
    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on the CPU")
    base = build(a.tiny, device)
    quant = copy.deepcopy(base)
    backend = quantize_tower(quant.model.vision_tower, a.backend)
    layers = base.config.vision_config.num_hidden_layers
    rc = registers(base, a.tau, layers // 3 if a.start is None else a.start)
    if a.compile:  # 4 shapes x prefix on / off x 2 towers: more variants than dynamo's default 8
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
    for m in (base, quant):
        mmsink.wrap(m, regcache=rc)
        if a.compile:
            tower = m.model.vision_tower
            for layer in getattr(tower, "vision_model", tower).encoder.layers:
                layer.compile()
    side = base.config.vision_config.image_size
    models = {"bf16": base, "int8": quant}
    clock, results = timer(device), {}
    for shape, n in SHAPES.items():
        pv = torch.randn(n, 3, side, side, device=device, dtype=torch.bfloat16)
        calls = {row: call(models[row.split("+")[0]], pv, "+regcache" in row) for row in ROWS}
        with torch.inference_mode():
            feats = {row: calls[row]() for row in ROWS}
            for _ in range(a.warmup):
                for row in ROWS:
                    calls[row]()
            times = {row: [] for row in ROWS}
            for _ in range(a.reps):
                for row in ROWS:
                    times[row].append(clock(calls[row]))
        results[shape] = summarize(times, feats, n)
        on, off = torch.cat(list(feats["bf16+regcache"])).float(), torch.cat(list(feats["bf16"])).float()
        if torch.equal(on, off):
            raise SystemExit("the RegCache prefix did not change the features: it is not installed")
        print(shape, {r: results[shape][r]["median_ms"] for r in ROWS}, flush=True)
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__,
        "int8_backend": backend,
        "compile": a.compile,
        "tower": "tiny 64-wide, 2 blocks" if a.tiny else "CLIP ViT-L/14-336, random weights, bf16, SDPA",
        "tau": a.tau,
        "prefixed_blocks": f"{rc.start}..{layers - 1}",
        "reps": a.reps,
        "command": "python -m evals.regcache_speed " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write(Path(a.out), meta, results)


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


def write(out: Path, meta: dict, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "regcache_speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [
        f"# Vision tower W8A8 vs bf16, with and without RegCache ({meta['device']})",
        "",
        f"{meta['tower']}; int8: {meta['int8_backend']}; compile: {meta['compile']}; registers: tau "
        f"{meta['tau']} on blocks {meta['prefixed_blocks']}; median of {meta['reps']} alternated reps.",
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
    (out / "regcache_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
