"""One layer's decode attention at 7B shapes: the Triton kernels (``mmsink.fast.decode_kernel``, which also
write the new key / value / validity) against what the plain step does (index writes of key, value and
validity, then SDPA with the boolean mask), and the kernels' block / program / warp choices.

    python evals/decode_kernel_speed.py --out evals/results/decode_kernel   # one GPU
    python evals/decode_kernel_speed.py --tiny --out /tmp/dk                # CPU: checks the code path

Each variant is captured as a CUDA graph of ``--layers`` calls (one per layer's own buffers, so the reads
come from HBM as in the step, not from L2) and replayed ``--reps`` times, alternated variant by variant;
microseconds per layer call, median of the reps (CUDA events). The read floor: the valid keys' and values'
bytes at the GPU's measured copy bandwidth (a device-to-device copy of the same buffers, timed alike).
JSON + Markdown to ``--out``, rewritten after each shape.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from mmsink.fast import decode_kernel as dk
from mmsink.fast.decode import write_slot
from mmsink.tools.timing import alternated, probe_start

# (name, batch, heads, kv heads, slots, valid slots): LLaVA-1.5-7B (641-token prompt + 64), LLaVA-NeXT-7B
# unpruned (2928 + text) and pruned to 320, a batch of 16, Qwen2-VL-7B (GQA 28 / 4), NeXT pruned at batch 128
SHAPES = [
    ("llava-1.5-7b b1", 1, 32, 32, 768, 705),
    ("llava-next-7b b1", 1, 32, 32, 3072, 3050),
    ("llava-next-7b b1 pruned 320", 1, 32, 32, 512, 450),
    ("llava-1.5-7b b16", 16, 32, 32, 768, 705),
    ("qwen2-vl-7b b1", 1, 28, 4, 2688, 2600),
    ("llava-next-7b b128 pruned 320", 128, 32, 32, 512, 450),  # serving's batches
]
# serving's largest batches (mmsink serve-bench, part 39): NeXT pruned to 320 (VisionZip) and unpruned,
# mid-decode, and the batch of 128; ``--serving``: these, then the others, block / programs / warps swept
# (tried and dropped, evals/results/gpu_next/h200 parts 48-51: Triton's num_stages and a pipelined loop,
# which changed nothing or lost; a running softmax per row of the block, which lost at most shapes)
SERVING = [
    ("llava-next-7b b412 pruned 320", 412, 32, 32, 512, 416),
    ("llava-next-7b b76", 76, 32, 32, 3072, 3040),
    SHAPES[-1],
]
SERVING_TUNES = [
    dict(block=bl, programs=pr, warps=w) for bl, pr, w in itertools.product((32, 64), (512, 8192), (2, 4))
]
BUFFERS = 16e9  # bytes of key / value buffers per shape at most: fewer calls per graph for the large ones
TINY = [("tiny", 2, 4, 2, 96, 80)]
TUNES = [
    dict(block=bl, programs=pr, warps=w)
    for bl, pr, w in itertools.product((32, 64), (256, 512, 1024), (2, 4, 8))
]


def head_size(dev) -> int:
    return 128 if dev == "cuda" else 16  # the 7B models' on a GPU; the CPU run checks the code path


def inputs(b, h, kvh, s, n, layers, dev, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, 1, h, head_size(dev), generator=g).to(dev, dtype).transpose(1, 2)
    d = q.shape[-1]
    k, v = (torch.randn(b, kvh, 1, d, generator=g).to(dev, dtype) for _ in range(2))
    gd = torch.Generator(device=dev).manual_seed(1)  # the buffers drawn where they live (serving's are GBs)
    bufs = []
    for _ in range(layers):
        kb, vb = (torch.randn(b, kvh, s, d, generator=gd, device=dev, dtype=dtype) for _ in range(2))
        ok = torch.zeros(b, s, dtype=torch.bool, device=dev)
        ok[:, : n - 1] = True
        bufs.append((kb, vb, ok))
    start = torch.tensor(n - 1, device=dev)
    t = torch.zeros((), dtype=torch.long, device=dev)
    angle = torch.rand(b, 1, d // 2, generator=g).repeat(1, 1, 2) * 6.3
    rot = (angle.cos().to(dev, dtype), angle.sin().to(dev, dtype))  # the step's cos / sin
    return q, k, v, bufs, start, t, rot


def plain(q, k, v, kb, vb, ok, start, t, scale):
    write_slot(kb, vb, ok, k, v, (start + t).view(1))
    gqa = q.shape[1] != kb.shape[1]
    return F.scaled_dot_product_attention(
        q, kb, vb, attn_mask=ok[:, None, None, :], scale=scale, enable_gqa=gqa
    )


def measure(shape, dev, dtype, layers, reps, tunes, kernel=dk.launch):
    name, b, h, kvh, s, n = shape
    per_layer = 2 * b * kvh * s * head_size(dev) * torch.finfo(dtype).bits // 8
    layers = max(2, min(layers, int(BUFFERS // per_layer)))  # each still far past the L2
    q, k, v, bufs, start, t, rot = inputs(b, h, kvh, s, n, layers, dev, dtype)
    scale = q.shape[-1] ** -0.5
    variants = {"sdpa + index writes": lambda: [plain(q, k, v, *x, start, t, scale) for x in bufs]}
    lock = torch.zeros(b * h, dtype=torch.int32, device=dev)  # the kernel's counts, as the step keeps them
    variants["kernel (default)"] = lambda: [kernel(q, k, v, *x, start, t, scale, rot, lock) for x in bufs]
    variants["kernel, q / k rotated before"] = lambda: [
        kernel(q, k, v, *x, start, t, scale, None, lock) for x in bufs
    ]
    for tu in tunes:
        key = "kernel " + " ".join(f"{name} {val}" for name, val in tu.items())
        variants[key] = lambda tu=tu: [kernel(q, k, v, *x, start, t, scale, rot, lock, **tu) for x in bufs]
    src = [torch.cat([x[0][:, :, :n], x[1][:, :, :n]]) for x in bufs]
    dst = [torch.empty_like(x) for x in src]
    variants["copy of the valid keys and values"] = lambda: [d_.copy_(s_) for d_, s_ in zip(dst, src)]
    med = alternated(variants, dev, reps, layers)
    nbytes = src[0].numel() * src[0].element_size()
    copy_us = med.pop("copy of the valid keys and values")
    floor = (
        nbytes / (2 * nbytes / (copy_us * 1e-6)) * 1e6
    )  # read-only bytes at the copy's rate (read + write)
    return dict(
        shape=name, batch=b, heads=h, kv_heads=kvh, slots=s, valid=n, kv_bytes=nbytes, layers=layers,
        copy_us=round(copy_us, 2), read_floor_us=round(floor, 2),
        us={key: round(v_, 2) for key, v_ in med.items()},
    )  # fmt: skip


def table(res) -> str:
    out = [f"Command: `{res['command']}`  ", f"Machine: {res['machine']}, torch {res['torch']}\n"]
    out.append(
        "One layer's decode attention, microseconds per call (median of the reps; each variant captured "
        f"as a CUDA graph of one call per layer's buffers: up to {res['layers']}, fewer where they would "
        f"pass {BUFFERS / 1e9:.0f} GB). The kernels also rotate q and the new key (the step's default; "
        "SDPA's row takes them rotated). Read floor: the valid keys' and values' bytes read at the rate of "
        "a device copy of them (at serving's batches a copy runs below the attention's rate: no floor "
        "there).\n"
    )
    for r in res["shapes"]:
        base = r["us"]["sdpa + index writes"]
        heads = f"{r['heads']} / {r['kv_heads']} heads"
        valid = f"{r['valid']} of {r['slots']} slots valid; read floor {r['read_floor_us']} us"
        valid += f"; {r['layers']} calls per graph" if "layers" in r else ""
        out.append(f"\n**{r['shape']}** (batch {r['batch']}, {heads}, {valid})\n")
        out.append("| variant | us / layer | vs sdpa |\n|---|---|---|")
        for key, us in sorted(r["us"].items(), key=lambda kv: kv[1]):
            out.append(f"| {key} | {us:.2f} | {us / base:.3f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="calls per graph (default 32; --tiny 2)")
    ap.add_argument("--reps", type=int, default=None, help="default 20; --tiny 2")
    ap.add_argument("--no-tunes", action="store_true", help="only the default kernel against SDPA")
    ap.add_argument(
        "--serving", action="store_true", help="serving's batches first, block / programs / warps swept"
    )
    args = ap.parse_args(argv)
    layers = args.layers or (2 if args.tiny else 32)
    reps = args.reps or (2 if args.tiny else 20)
    tunes = [] if args.no_tunes or args.tiny else SERVING_TUNES if args.serving else TUNES
    dev, out, res = probe_start("decode_kernel_speed", args, dk.available, argv, layers=layers, reps=reps)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for shape in TINY if args.tiny else SERVING + SHAPES[:-1] if args.serving else SHAPES:
        print(f"[decode_kernel_speed] {shape[0]}", flush=True)
        # without Triton's interpreter the CPU run times the reference in the kernels' place (the code path)
        kernel = dk.launch if dk.available(dev) else dk.reference
        res["shapes"].append(measure(shape, dev, dtype, layers, reps, tunes, kernel))
        (out / "decode_kernel_speed.json").write_text(json.dumps(res, indent=1))
        (out / "decode_kernel_speed.md").write_text(table(res))
        print(table(dict(res, shapes=res["shapes"][-1:])), flush=True)


if __name__ == "__main__":
    main()
