"""The decode step's projections at LLaVA-1.5-7B's shapes: the Triton GEMV (``mmsink.fast.gemv``, residual
add fused) against cuBLAS (``F.linear``, and the residual's add as its own kernel where the GEMV fuses
one), at the kernel's default tune and others.

    python evals/gemv_speed.py --out evals/results/gemv                     # one GPU
    python evals/gemv_speed.py --shapes qkv,o --rows 1 --out DIR            # a part of it
    python evals/gemv_speed.py --tiny --out /tmp/gemv                       # CPU: checks the code path

Per shape and row count each variant is captured as a CUDA graph of ``--copies`` calls, one per weight
tensor of its own (so the weights come from HBM as in the step, not from L2: 32 of the smallest are
1 GiB), and replayed ``--reps`` times, alternated variant by variant; microseconds per call, median of the
reps (CUDA events), and the weight bytes read per second (TB/s; the H200's HBM peak is 4.8). The copy
row: a device-to-device copy of the same weights, timed alike, as read + written bytes per second (what
the GPU's memory gives a plain stream). Each variant's largest error on the first weight against
``gemv.reference``, relative to the largest output (bf16's rounding: up to 2 ** -8). JSON + Markdown to
``--out``, rewritten after each shape.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from mmsink.fast import gemv
from mmsink.tools.timing import alternated, probe_start

# name: (N, K, the step adds the residual) of LLaVA-1.5-7B (Llama-2-7B): fused q / k / v, o_proj, fused
# gate / up, down_proj, the LM head (not in the step's GEMVs: for scale)
SHAPES = {
    "qkv": (12288, 4096, False),
    "o": (4096, 4096, True),
    "gate_up": (22016, 4096, False),
    "down": (4096, 11008, True),
    "lm_head": (32064, 4096, False),
}
TINY = {"tiny o": (48, 64, True), "tiny qkv": (40, 96, False)}
# (block_n, block_k, warps, stages, dot): the dot form's tile / pipeline depth, and the element-wise form
TUNES = [
    (16, 128, 4, 6, True),
    (16, 256, 4, 3, True),
    (16, 256, 4, 4, True),
    (16, 256, 2, 4, True),
    (16, 512, 4, 3, True),
    (32, 128, 4, 5, True),
    (32, 256, 4, 4, True),
    (32, 256, 8, 4, True),
    (64, 128, 4, 4, True),
    (8, 512, 4, 1, False),
    (8, 1024, 4, 1, False),
    (16, 256, 4, 1, False),
    (16, 512, 4, 1, False),
]


def tune_name(t: dict) -> str:
    form = "dot" if t["dot"] else "element-wise"
    return f"{form} {t['block_n']}x{t['block_k']} warps {t['warps']} stages {t['stages']}"


def measure(name, n, k, res, m, dev, dtype, copies, reps, tunes, kernel):
    g = torch.Generator(device=dev).manual_seed(0)
    ws = [(torch.randn(n, k, generator=g, device=dev) / k**0.5).to(dtype) for _ in range(copies)]
    x = torch.randn(m, k, generator=g, device=dev).to(dtype)
    r = torch.randn(m, n, generator=g, device=dev).to(dtype) if res else None
    one = {}  # variant: its call on one weight
    if res:
        one["cublas + add"] = lambda w: r + F.linear(x, w)
    one["cublas"] = lambda w: F.linear(x, w)
    default = gemv.config(m, n, k, dtype)
    one["kernel (default)"] = lambda w: kernel(x, w, None, r)
    for tu in tunes:
        if tu != default:
            one["kernel " + tune_name(tu)] = lambda w, tu=tu: kernel(x, w, None, r, **tu)
    # every variant's output on the first weight against the reference, relative to its largest value
    # (a tune that computes wrong is no tune; bf16 rounds at 2 ** -8 of it)
    want = gemv.reference(x, ws[0], None, r).float()
    alone = gemv.reference(x, ws[0]).float()  # cuBLAS's row without the add
    errs = {}
    for key, fn in one.items():
        ref = alone if key == "cublas" else want
        try:
            errs[key] = float((fn(ws[0]).float() - ref).abs().max() / ref.abs().max())
        except Exception as e:  # a tune the GPU refuses (shared memory, registers): noted, not fatal
            print(f"[gemv_speed]   {key}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    variants = {key: lambda fn=fn: [fn(w) for w in ws] for key, fn in one.items() if key in errs}
    dst = [torch.empty_like(w) for w in ws]
    variants["copy of the weights"] = lambda: [d_.copy_(w) for d_, w in zip(dst, ws)]
    med = alternated(variants, dev, reps, copies)
    nbytes = ws[0].numel() * ws[0].element_size()
    copy_us = med.pop("copy of the weights")
    out = dict(
        shape=name, n=n, k=k, rows=m, residual=res, weight_bytes=nbytes, default=tune_name(default),
        copy_us=round(copy_us, 2), copy_tbps=round(2 * nbytes / copy_us / 1e6, 3),
        us={key: round(v, 2) for key, v in med.items()},
        tbps={key: round(nbytes / v / 1e6, 3) for key, v in med.items()},
        rel_err={key: float(f"{v:.3g}") for key, v in errs.items()},
    )  # fmt: skip
    ws.clear()  # the weights (the graphs went with alternated): the next shape's room
    dst.clear()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def table(res) -> str:
    out = [f"Command: `{res['command']}`  ", f"Machine: {res['machine']}, torch {res['torch']}\n"]
    out.append(
        "One projection y = x @ W.T (+ residual), microseconds per call (median of the reps; each variant "
        f"captured as a CUDA graph of {res['copies']} calls on separate weights) and weight bytes read per "
        "second. `cublas + add`: F.linear then the residual's add (what the step without the GEMV runs); "
        "the kernel adds the residual itself. Copy: a device copy of the weights, read + written bytes "
        "per second.\n"
    )
    for r in res["shapes"]:
        base = r["us"].get("cublas + add", r["us"]["cublas"])
        head = f"N {r['n']}, K {r['k']}, {r['rows']} row(s), {r['weight_bytes'] / 2**20:.1f} MiB"
        out.append(f"\n**{r['shape']}** ({head}; copy {r['copy_tbps']} TB/s; default {r['default']})\n")
        out.append("| variant | us / call | TB/s | vs cuBLAS | max error / max of y |\n|---|---|---|---|---|")
        for key, us in sorted(r["us"].items(), key=lambda kv: kv[1]):
            err = r["rel_err"][key]
            out.append(f"| {key} | {us:.2f} | {r['tbps'][key]:.3f} | {us / base:.3f} | {err:.2g} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--shapes", default=None, help=f"comma-separated of {', '.join(SHAPES)} (default all)")
    ap.add_argument("--rows", default="1,4", help="row counts (1 to 4), comma-separated")
    ap.add_argument(
        "--copies", type=int, default=None, help="weights (calls) per graph (default 32; --tiny 2)"
    )
    ap.add_argument("--reps", type=int, default=None, help="default 20; --tiny 2")
    ap.add_argument("--no-tunes", action="store_true", help="only the default kernel against cuBLAS")
    args = ap.parse_args(argv)
    dev = "cpu" if args.tiny else "cuda"
    shapes = TINY if args.tiny else SHAPES
    if args.shapes:
        bad = set(args.shapes.split(",")) - set(shapes)
        if bad:
            ap.error(f"unknown shape(s) {sorted(bad)}: use {', '.join(shapes)}")
        shapes = {s: shapes[s] for s in args.shapes.split(",")}
    rows = [int(v) for v in args.rows.split(",")]
    if not all(1 <= v <= gemv.ROWS for v in rows):
        ap.error(f"--rows: 1 to {gemv.ROWS}")
    copies = args.copies or (2 if args.tiny else 32)
    reps = args.reps or (2 if args.tiny else 20)
    tunes = (
        []
        if args.no_tunes
        else [dict(zip(("block_n", "block_k", "warps", "stages", "dot"), t)) for t in TUNES]
    )
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if args.tiny:  # the code path: the element-wise form's tunes (fp32); the reference where no interpreter
        tunes = [t for t in tunes if not t["dot"]][:2]
    if gemv.available(dev):
        kernel = gemv.launch
    else:

        def kernel(x, w, bias, residual, **tune):
            return gemv.reference(x, w, bias, residual)

    meta = dict(copies=copies, reps=reps, kernel=kernel is gemv.launch)
    dev, out, res = probe_start("gemv_speed", args, gemv.available, argv, **meta)
    for name, (n, k, fused) in shapes.items():
        for m in rows:
            print(f"[gemv_speed] {name} ({n} x {k}), {m} row(s)", flush=True)
            res["shapes"].append(measure(name, n, k, fused, m, dev, dtype, copies, reps, tunes, kernel))
            (out / "gemv_speed.json").write_text(json.dumps(res, indent=1))
            (out / "gemv_speed.md").write_text(table(res))
            print(table(dict(res, shapes=res["shapes"][-1:])), flush=True)
    return res


if __name__ == "__main__":
    main()
