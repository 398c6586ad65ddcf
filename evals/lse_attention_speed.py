"""``attention_lse`` (attention output + log-sum-exp per row over the allowed keys) through both CUDA kernels
``lse_backend`` chooses between, cuDNN's fused attention and the memory-efficient kernel, at the shapes of
VisiPruner's shallow stage and VAR's prefill at LLaVA-1.5-7B (batch 1 and 16), with the masks made once
(``lse_masks``, as the callers' memos keep them).

    python evals/lse_attention_speed.py --out evals/results/lse_attention   # one GPU
    python evals/lse_attention_speed.py --tiny --out /tmp/lse               # CPU: checks the code path

Each backend (``MMSINK_LSE_ATTENTION``, read at each call) is timed with CUDA events around ``--inner``
calls, eager (what VisiPruner's eager prefill pays, host work included) and replayed as a CUDA graph of
the same calls, alternated backend by backend for ``--reps`` reps; microseconds per call, median of the
reps. The first call at each shape is timed apart (wall clock): cuDNN builds an execution plan for each
new shape and strides (then cached), which eager callers pay for every new prompt length. Each shape also
gets the largest differences of the outputs and the LSEs between the two (rows with an allowed key; the
rows without must agree on -inf) and of each against ``attention_lse_math`` in fp32.
Without CUDA the command exits unless ``--tiny``: then tiny shapes run through the CPU kernel (the same
one for both names), which only checks the command line and the files. JSON + Markdown to ``--out``,
rewritten after each shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mmsink.core import attention as att
from mmsink.tools.timing import timer

# (name, batch, heads, query rows, keys): LLaVA-1.5-7B, a 641-token prompt (576 image tokens, 65 others;
# ~48 text rows after the image). VisiPruner layer 0 edits every row (the image group's and the other
# keys' partial attentions), its layers 1..S-1 the text rows (the other keys only, the image group's mass
# from the plain attention's LSE); VAR's prefill attends its 4 key groups for the edited text rows in one
# call (rows repeated per group) over every key.
SHAPES = [
    (f"{name} b{b}", b, 32, n, m)
    for b in (1, 16)
    for name, n, m in (
        ("visipruner L0 rows x image keys", 641, 576),
        ("visipruner L0 rows x other keys", 641, 65),
        ("visipruner text rows x other keys", 48, 65),
        ("grouped 640 x 640", 640, 640),
        ("var prefill 4 groups x 48 rows x all keys", 192, 641),
    )
]
TINY = [("tiny", 2, 4, 24, 37)]


def inputs(b, h, n, m, d, dev, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, x, d, generator=g).to(dev, dtype) for x in (n, m, m))
    # causal by position with the rows the last n keys' (left padding in the batch), a few rows empty
    pos = torch.arange(m)
    rows = pos[m - n :] if n <= m else torch.arange(n) % m
    allowed = (pos[None, :] <= rows[:, None]).expand(b, 1, n, m).clone()
    for i in range(b):
        allowed[i, :, :, : (i * 7) % 32] = False
    allowed[:, :, n // 3] = False
    allowed = allowed.to(dev)
    return q, k, v, allowed, att.lse_masks(allowed, dtype)


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def with_backend(name, fn):
    def call():
        old = os.environ.get(att.LSE_ENV)
        os.environ[att.LSE_ENV] = name
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[att.LSE_ENV]
            else:
                os.environ[att.LSE_ENV] = old

    return call


def measure(shape, dev, dtype, d, reps, inner):
    name, b, h, n, m = shape
    q, k, v, allowed, masks = inputs(b, h, n, m, d, dev, dtype)
    scale = d**-0.5
    calls = {
        be: with_backend(be, lambda: att.attention_lse(q, k, v, allowed, scale, masks))
        for be in att.LSE_BACKENDS
    }
    res, first_ms = {}, {}
    for be, fn in calls.items():  # the first call at a new shape: cuDNN builds its plan (cached per shape)
        sync(dev)
        t0 = time.perf_counter()
        res[be] = fn()
        sync(dev)
        first_ms[be] = round((time.perf_counter() - t0) * 1e3, 2)
    o_ref, lse_ref = att.attention_lse_math(q.float(), k.float(), v.float(), allowed, scale)
    ok = torch.isfinite(lse_ref)
    (oc, lc), (oe, le) = res["cudnn"], res["efficient"]
    diffs = dict(
        out_cudnn_vs_efficient=(oc.float() - oe.float()).abs().max().item(),
        lse_cudnn_vs_efficient=(lc[ok] - le[ok]).abs().max().item(),
        empty_rows_agree=bool(torch.equal(torch.isneginf(lc), torch.isneginf(le))),
    )
    for be, (o, lse) in res.items():
        diffs[f"out_{be}_vs_math"] = (o.float()[ok] - o_ref[ok]).abs().max().item()
        diffs[f"lse_{be}_vs_math"] = (lse[ok] - lse_ref[ok]).abs().max().item()
    del o_ref, lse_ref
    chosen = att.lse_backend(q, masks[1]) if dev == "cuda" else "cpu kernel"
    us = {}
    for graph in (False, True) if dev == "cuda" else (False,):
        mode = "graph" if graph else "eager"
        runs = {}
        for be, fn in calls.items():
            try:
                runs[be] = timer(fn, dev, inner, graph)
            except RuntimeError as e:  # e.g. a kernel that cannot be captured: recorded, not fatal
                us[f"{be} {mode}"] = f"error: {str(e).splitlines()[0][:120]}"
        times = {be: [] for be in runs}
        for _ in range(reps):
            for be, run in runs.items():
                times[be].append(run())
        us.update({f"{be} {mode}": round(statistics.median(t), 2) for be, t in times.items()})
    return dict(
        shape=name, batch=b, heads=h, rows=n, keys=m, head_dim=d, default_backend=chosen, us=us,
        first_call_ms=first_ms,
        diffs={key: (round(x, 6) if isinstance(x, float) else x) for key, x in diffs.items()},
    )  # fmt: skip


def table(res) -> str:
    out = [f"Command: `{res['command']}`  ", f"Machine: {res['machine']}; {res['versions']}\n"]
    clock = "wall clock" if res["machine"].startswith("cpu") else "CUDA events"
    out.append(
        f"attention_lse, microseconds per call (median of the reps; {clock} around {res['inner']} calls, "
        "eager and as one CUDA graph), and the largest differences of the outputs and LSEs (rows with an "
        "allowed key) between the backends and against fp32 math. First call: the first call at the "
        "shape, host and device (cuDNN builds and caches an execution plan per shape and strides).\n"
    )
    out.append(
        "| shape | rows x keys | default | cudnn eager | efficient eager | cudnn graph | efficient graph "
        "| first call ms (cudnn / eff) | out cudnn-eff | lse cudnn-eff | out vs math (cudnn / eff) "
        "| lse vs math (cudnn / eff) |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def cell(x):
        return "" if x is None else (f"{x:.2f}" if isinstance(x, float) else str(x))

    for r in res["shapes"]:
        u, df = r["us"], r["diffs"]
        out.append(
            f"| {r['shape']} | {r['rows']} x {r['keys']} | {r['default_backend']} "
            f"| {cell(u.get('cudnn eager'))} | {cell(u.get('efficient eager'))} "
            f"| {cell(u.get('cudnn graph'))} | {cell(u.get('efficient graph'))} "
            f"| {r['first_call_ms']['cudnn']:.1f} / {r['first_call_ms']['efficient']:.1f} "
            f"| {df['out_cudnn_vs_efficient']:.2e} | {df['lse_cudnn_vs_efficient']:.2e} "
            f"| {df['out_cudnn_vs_math']:.2e} / {df['out_efficient_vs_math']:.2e} "
            f"| {df['lse_cudnn_vs_math']:.2e} / {df['lse_efficient_vs_math']:.2e} |"
        )
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes through the CPU kernel")
    ap.add_argument("--reps", type=int, default=None, help="default 20; --tiny 2")
    ap.add_argument("--inner", type=int, default=None, help="calls per timing, default 10; --tiny 2")
    args = ap.parse_args(argv)
    dev = "cpu" if args.tiny else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("lse_attention_speed: needs CUDA (or --tiny for the CPU code path)")
    reps = args.reps or (2 if args.tiny else 20)
    inner = args.inner or (2 if args.tiny else 10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    if dev == "cuda":
        versions += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    res = dict(
        command="python " + " ".join(sys.argv),
        machine=torch.cuda.get_device_name() if dev == "cuda" else cpu,
        versions=versions, reps=reps, inner=inner, shapes=[],
    )  # fmt: skip
    dtype = torch.bfloat16
    d = 128 if dev == "cuda" else 16
    shapes = TINY if args.tiny else SHAPES
    for i, shape in enumerate(shapes):
        print(f"[lse_attention_speed] {i + 1}/{len(shapes)} {shape[0]}", flush=True)
        res["shapes"].append(measure(shape, dev, dtype, d, reps, inner))
        (out / "lse_attention_speed.json").write_text(json.dumps(res, indent=1))
        (out / "lse_attention_speed.md").write_text(table(res))
        print(table(dict(res, shapes=res["shapes"][-1:])), flush=True)


if __name__ == "__main__":
    main()
