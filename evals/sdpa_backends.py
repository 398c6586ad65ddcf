"""Which SDPA kernel is fastest at the shapes our prefills run (issue 20: Qwen2-VL's tower, the LLM
prefill)? Each backend PyTorch has (flash, cuDNN, memory-efficient) timed alone on the same inputs with
CUDA events, its output against the memory-efficient kernel's.

    python -m evals.sdpa_backends --out evals/results/sdpa_backends

Shapes: Qwen2-VL-7B's vision attention over one 1400x1400 image (10,000 patches, 16 heads of 80, not
causal), LLaVA-NeXT-7B's LLM prefill (2,928 tokens, 32 heads of 128, causal), CLIP-L/336's (577 tokens x 5
tiles, 16 heads of 64). On a CPU only the command line is checked (tiny shapes, the math kernel)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # name: (batch, heads, tokens, head dim, causal)
    "qwen2-vl vision, 10000 patches": (1, 16, 10000, 80, False),
    "llava-next llm prefill, 2928 tokens": (1, 32, 2928, 128, True),
    "clip-l/336 tower, 5 tiles": (5, 16, 577, 64, False),
}
BACKENDS = {  # "default": no choice made (what the model's SDPA call gets)
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def flops(b, h, n, d, causal) -> float:
    return 4 * b * h * n * n * d / (2 if causal else 1)


def timed(fn, reps: int) -> float:
    """Median ms of ``fn`` over ``reps`` calls (CUDA events), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    rows = []
    for name, (b, h, n, d, causal) in SHAPES.items():
        if not cuda:
            n = min(n, 64)
        g = torch.Generator(dev).manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
        call = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal)
        if not cuda:
            with sdpa_kernel([SDPBackend.MATH]):
                call()
            rows.append(dict(shape=name, backend="math (CPU check)", ms=None, tflops=None, max_diff=None))
            continue
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            ref = call()
        for bname, backend in BACKENDS.items():
            try:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    out = call()
                    ms = timed(call, a.reps)
            except RuntimeError as e:
                rows.append(
                    dict(
                        shape=name,
                        backend=bname,
                        ms=None,
                        tflops=None,
                        max_diff=None,
                        error=str(e).split("\n")[0][:120],
                    )
                )
                print(f"{name}: {bname} not available", flush=True)
                continue
            row = dict(
                shape=name,
                backend=bname,
                ms=round(ms, 3),
                tflops=round(flops(b, h, n, d, causal) / ms / 1e9, 1),
                max_diff=float((out.float() - ref.float()).abs().max()),
            )
            rows.append(row)
            print(
                f"{name}: {bname} {row['ms']} ms, {row['tflops']} TFLOP/s, max diff {row['max_diff']:.3g}",
                flush=True,
            )
    env = dict(
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if cuda else platform.processor(),
        cudnn=torch.backends.cudnn.version() if cuda else None,
    )
    cmd = "python -m evals.sdpa_backends " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{cmd}`  ",
        f"Machine: {env}",
        "",
        "| shape | backend | ms | TFLOP/s | max abs diff vs efficient |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.0f}"
        diff = r.get("error", "-") if r["max_diff"] is None else f"{r['max_diff']:.3g}"
        lines.append(f"| {r['shape']} | {r['backend']} | {ms} | {tf} | {diff} |")
    print("\n".join(lines))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "sdpa_backends.json"), "w") as f:
            json.dump(dict(command=cmd, environment=env, rows=rows), f, indent=1)
        with open(os.path.join(a.out, "sdpa_backends.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
