"""Qwen2-VL's VisionZip scores for one image (the attention each patch receives in the tower's last block,
summed over the queries): the Triton kernels (``mmsink.core.received``) against the torch path that
``Family.received`` takes without them (chunks of 1024 query rows: the GEMM with fp32 output, the scale,
the softmax and the sum over a chunk's [H, 1024, P] logits), at the kernels' default tune and others.

    python evals/received_speed.py --out evals/results/received        # one GPU
    python evals/received_speed.py --tiny --out /tmp/received          # CPU: checks the code path

q and k as the tower's last block has them ([patches, heads, head dim], bf16), each variant from those
(the torch path's contiguous copies included, as in ``Family.received``); captured as a CUDA graph and
replayed ``--reps`` times, alternated variant by variant; microseconds per image, median of the reps
(CUDA events). Each variant's largest relative difference from the torch path's sums. JSON + Markdown to
``--out``, rewritten after each shape.
"""

from __future__ import annotations

import argparse
import json

import mmsink.patches.qwen2_vl as family
import torch

from mmsink.core import received
from mmsink.tools.timing import alternated, probe_start

# (name, heads, patches, head dim): Qwen2-VL-7B's tower (16 heads of 80) on a 1400x1400 and a 700x700 image
SHAPES = [("qwen2-vl 1400x1400", 16, 10_000, 80), ("qwen2-vl 700x700", 16, 2_500, 80)]
TINY = [("tiny", 2, 150, 16)]
# (block_m, block_n, warps, stages)
TUNES = [
    (64, 128, 4, 3),
    (64, 64, 4, 3),
    (64, 128, 8, 3),
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (64, 256, 8, 3),
    (32, 128, 4, 4),
]


def torch_path(q, k, scale):
    """``Family.received``'s loop for one segment without the kernels: [H, P] fp32."""
    kk = k.transpose(0, 1).contiguous()
    n = q.shape[0]
    acc = torch.zeros(kk.shape[0], n, device=q.device)
    for c in range(0, n, family.CHUNK):
        qq = q[c : min(c + family.CHUNK, n)].transpose(0, 1).contiguous()
        acc += family.softmax_column_sums(qq, kk, scale)
    return acc


def tune_name(t) -> str:
    return f"kernels {t[0]}x{t[1]}, {t[2]} warps, {t[3]} stages"


def measure(shape, dev, dtype, reps, tunes):
    name, h, p, hd = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(p, h, hd, generator=g).to(dev, dtype)
    k = (torch.randn(p, h, hd, generator=g) * 2).to(dev, dtype)
    scale = hd**-0.5
    qs, ks = q.transpose(0, 1), k.transpose(0, 1)
    variants = {"torch (chunks of 1024 rows)": lambda: torch_path(q, k, scale)}
    variants["kernels (default)"] = lambda: received.column_sums(qs, ks, scale)
    if received.fits(qs, ks):
        for t in tunes:
            bm, bn, w, st = t
            variants[tune_name(t)] = lambda bm=bm, bn=bn, w=w, st=st: received.launch(
                qs, ks, scale, block_m=bm, block_n=bn, warps=w, stages=st
            )
    base = torch_path(q, k, scale)
    diff = {}
    for key, fn in list(variants.items()):
        try:
            diff[key] = float(((fn() - base).abs() / base.abs()).max())
        except Exception as e:  # a tune that does not compile (shared memory): left out, said why
            print(f"[received_speed] {key}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            variants.pop(key)
    med = alternated(variants, dev, reps)
    flops = 2 * 2 * h * p * p * hd  # q k^T twice (each kernel pass; the torch path's once)
    return dict(
        shape=name, heads=h, patches=p, head_dim=hd, dtype=str(dtype).replace("torch.", ""), qk_flops=flops,
        us={key: round(v, 2) for key, v in med.items()},
        rel_diff={key: diff[key] for key in med},
    )  # fmt: skip


def table(res) -> str:
    out = [f"Command: `{res['command']}`  ", f"Machine: {res['machine']}, torch {res['torch']}\n"]
    out.append(
        "VisionZip's received attention for one image (softmax column sums over all queries), microseconds "
        "per image (median of the reps; CUDA graph replays, alternated). rel diff: the largest relative "
        "difference from the torch path's sums.\n"
    )
    for r in res["shapes"]:
        base = r["us"]["torch (chunks of 1024 rows)"]
        size = f"{r['heads']} heads, {r['patches']} patches, head dim {r['head_dim']}, {r['dtype']}"
        out.append(f"\n**{r['shape']}** ({size})\n")
        out.append("| variant | us / image | vs torch | rel diff |\n|---|---|---|---|")
        for key, us in sorted(r["us"].items(), key=lambda kv: kv[1]):
            out.append(f"| {key} | {us:.1f} | {us / base:.3f} | {r['rel_diff'][key]:.2e} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=None, help="default 20; --tiny 2")
    ap.add_argument("--no-tunes", action="store_true", help="only the default kernels against torch")
    args = ap.parse_args(argv)
    reps = args.reps or (2 if args.tiny else 20)
    tunes = [] if args.no_tunes or args.tiny else TUNES
    dev, out, res = probe_start("received_speed", args, received.available, argv, reps=reps)
    for shape in TINY if args.tiny else SHAPES:
        print(f"[received_speed] {shape[0]}", flush=True)
        # on the CPU without the interpreter the kernels' row times column_sums' torch path (the code path)
        res["shapes"].append(measure(shape, dev, torch.bfloat16, reps, tunes))
        (out / "received_speed.json").write_text(json.dumps(res, indent=1))
        (out / "received_speed.md").write_text(table(res))
        print(table(dict(res, shapes=res["shapes"][-1:])), flush=True)


if __name__ == "__main__":
    main()
