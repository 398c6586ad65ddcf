"""Decode cost of the KV-cache modes at long context (issue 17): dense, sink + window, int4 (KVSink) and
LFPS. A LLaVA whose language model has LLaMA-7B's attention shapes (hidden 4096, 32 heads of 128, MLP
11008) but ``--layers`` layers and random weights (the cost per layer is what differs between modes);
a text prompt of each ``--contexts`` length, then ``--steps`` greedy tokens through ``model.generate``.

Per (context, mode): decode ms per token ((t(steps) - t(1)) / (steps - 1), so the prefill cancels), KV
bytes held after the run, peak memory; and, separately, one layer's decode attention alone at each
context: SDPA over every key against LFPS's ``select`` + ``attend`` (topk 512, history of the previous
step as random slots), the issue's ">= 3x faster attention at 32k" goal.

    python -m evals.kv_decode --out evals/results/kv_decode            # CUDA, ~3 min
    python -m evals.kv_decode --tiny --contexts 256 --steps 4 --out /tmp/kvd   # CPU smoke run

The JSON and table are rewritten after every row, so a run cut by a time limit keeps what it measured.
On the H200 (no network, no optimum-quanto): ``bash evals/results/kv_decode/run.sh``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mmsink

MODES = {
    "dense": None,
    "window 2048 + 4 sinks": {"window": 2048, "sinks": 4},
    "int4 g32, 4 sinks kept": {"quant": "int4", "group_size": 32, "sinks": 4},
    "int4 g64, 4 sinks kept": {"quant": "int4", "group_size": 64, "sinks": 4},
    "lfps top-512": {"sparse": "lfps", "topk": 512},
}


def build(layers: int, tiny: bool, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    width = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    if not tiny:
        width = dict(
            hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32
        )
    text = LlamaConfig(num_hidden_layers=layers, vocab_size=32064, max_position_embeddings=40_000, **width)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=4)
    cfg.text_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def kv_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values, getattr(layer, "raw", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def decode_run(model, ids, steps: int, device):
    def gen(n):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                return_dict_in_generate=True,
            )
        sync(device)
        return time.perf_counter() - t0, out

    gen(2)  # warm-up
    t1, _ = gen(1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tn, out = gen(steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return 1000 * (tn - t1) / (steps - 1), kv_bytes(out.past_key_values), peak


def attention_only(context: int, device, dtype, reps: int = 50):
    """One layer's decode attention: SDPA over all keys vs LFPS's candidate scoring + top-k attention."""
    import torch.nn.functional as F

    from mmsink.kv.sparse import attend, select

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 32, 1, 128, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, 32, context, 128, device=device, dtype=dtype, generator=g)
    v = torch.randn_like(k)
    valid = torch.ones(1, context, dtype=torch.bool, device=device)
    hist = torch.randint(0, context - 1, (1, 32, 512), device=device, generator=g)

    def dense():
        return F.scaled_dot_product_attention(q, k, v)

    def lfps():
        scores, slots = select(q[:, :, 0], k, valid, hist, 512, 1, False, 128**-0.5)
        return attend(scores, slots.clamp(min=0), v)

    out = {}
    for name, fn in (("dense sdpa", dense), ("lfps", lfps)):
        for _ in range(5):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        out[name] = 1000 * (time.perf_counter() - t0) / reps
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="64-wide model (CPU smoke run)")
    ap.add_argument("--modes", default=";".join(MODES), help="';'-separated subset of: " + "; ".join(MODES))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.layers, args.tiny, device, dtype)
    modes = [m.strip() for m in args.modes.split(";")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"kv_decode: unknown mode(s) {unknown}; known: {list(MODES)}")
    meta = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        layers=args.layers,
        steps=args.steps,
        dtype=str(dtype),
    )
    rows, attn = [], []
    for ctx in (int(c) for c in args.contexts.split(",")):
        ids = torch.randint(
            3, 32000, (1, ctx), device=device, generator=torch.Generator(device=device).manual_seed(ctx)
        )
        for name in modes:
            kv = MODES[name]
            if kv is None:
                if model.__dict__.get("_mmsink") is not None:
                    mmsink.unwrap(model)
            else:
                mmsink.wrap(model, kv=kv)
            ms, kvb, peak = decode_run(model, ids, args.steps, device)
            rows.append(dict(context=ctx, mode=name, ms_per_token=ms, kv_bytes=kvb, peak_bytes=peak))
            print(rows[-1], flush=True)
            write(Path(args.out), meta, rows, attn)
        if model.__dict__.get("_mmsink") is not None:
            mmsink.unwrap(model)
        if not args.tiny:
            attn.append(dict(context=ctx, **attention_only(ctx, device, dtype)))
            print(attn[-1], flush=True)
            write(Path(args.out), meta, rows, attn)


def write(out: Path, meta: dict, rows: list, attn: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_decode.json").write_text(json.dumps(dict(meta=meta, decode=rows, attention=attn), indent=1))
    lines = [
        f"# KV-cache modes, decode cost ({meta['device']}, {meta['layers']} layers of LLaMA-7B width, "
        f"{meta['dtype']})",
        "",
        "| context | mode | ms / token | KV MiB | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] else "-"
        kv = r["kv_bytes"] / 2**20
        lines.append(f"| {r['context']} | {r['mode']} | {r['ms_per_token']:.2f} | {kv:.1f} | {peak} |")
    if attn:
        lines += ["", "| context | SDPA ms | LFPS ms | speed-up |", "|---|---|---|---|"]
        for a in attn:
            sdpa, lfps = a["dense sdpa"], a["lfps"]
            lines.append(f"| {a['context']} | {sdpa:.3f} | {lfps:.3f} | {sdpa / lfps:.2f}x |")
    (out / "kv_decode.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
