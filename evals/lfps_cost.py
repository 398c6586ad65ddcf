"""Aten ops and estimated bytes of one layer's LFPS decode attention at a real shape (issue 17), on
``meta`` tensors (shapes without memory or compute: runs on any CPU in seconds).

    python -m evals.lfps_cost --context 32768 --old-rev 3934e27 --out evals/results/kv_decode/lfps_cost

Per call variant (see ``variants``): aten ops other than views (about the kernels an eager call launches)
and bytes read / written per ``evals.op_cost`` (estimates from tensor sizes). ``--old-rev``: the same
variants with ``mmsink/kv/sparse.py`` as of that git revision, side by side. Dense SDPA is one fused
kernel on a GPU; on ``meta`` it would decompose into the math backend, so its row is the fused kernel's
reads (q, K, V) and write (out), computed, not counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from evals.op_cost import OpCost, footprint


def load_sparse(rev: str | None):
    """mmsink.kv.sparse, or its source at git revision ``rev`` run as a module."""
    import mmsink.kv.sparse as cur

    if rev is None:
        return cur
    src = subprocess.run(
        ["git", "show", f"{rev}:mmsink/kv/sparse.py"], capture_output=True, text=True, check=True
    )
    text = src.stdout.replace("from ..core.cache", "from mmsink.core.cache").replace(
        "from .window", "from mmsink.kv.window"
    )
    mod = type(sys)(f"sparse_{rev}")
    exec(compile(text, f"sparse.py@{rev}", "exec"), mod.__dict__)
    return mod


def variants(
    sp, context: int, topk: int, expand: int, heads: int, kv_heads: int, dim: int, dtype, spare: int
):
    """name -> zero-argument call, on meta tensors. ``lfps``: told that every sample is
    long (generate's cache after its one host check per step; the kv_decode bench's "lfps");
    ``lfps, device check``: ``step`` as generate_fast calls it (a buffer ``spare`` slots wider than the
    context, the held length a device scalar, whether samples are long decided on the device); ``lfps
    dense step``: a first step after the prompt (every key scored, the exact top-k seeds the history).
    Each is ``step``: the choice, the attention and the next history."""
    dev = "meta"
    q = torch.empty(1, heads, dim, device=dev, dtype=dtype)
    k = torch.empty(1, kv_heads, context + spare, dim, device=dev, dtype=dtype)
    v = torch.empty_like(k)
    kc, vc = k[:, :, :context], v[:, :, :context]
    valid = torch.ones(1, context, dtype=torch.bool, device=dev)
    wide = torch.ones(1, context + spare, dtype=torch.bool, device=dev)
    hist = torch.zeros(1, heads, topk, dtype=torch.long, device=dev)
    length = torch.zeros((), dtype=torch.long, device=dev)
    cfg = SimpleNamespace(topk=topk, expand=expand, dense_steps=2, sinks=0)
    scale = dim**-0.5

    return {
        "lfps": lambda: sp.step(q, kc, vc, valid, hist, cfg, False, scale, True),
        "lfps, device check": lambda: sp.step(q, k, v, wide, hist, cfg, False, scale, False, length=length),
        "lfps dense step": lambda: sp.step(q, kc, vc, valid, None, cfg, True, scale, None),
    }


def measure(fn) -> dict:
    with OpCost() as cost:
        fn()
    return dict(cost.summary(), table=cost.table())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--expand", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--spare", type=int, default=256, help="generate_fast's buffer slots past the context")
    ap.add_argument("--old-rev", default=None, help="also count mmsink/kv/sparse.py of this git revision")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    dtype = torch.bfloat16
    shape = (a.context, a.topk, a.expand, a.heads, a.kv_heads, a.dim, dtype, a.spare)
    kv = torch.empty(2, 1, a.kv_heads, a.context, a.dim, dtype=dtype, device="meta")
    dense_read = footprint(kv) + 2 * a.heads * a.dim * 2  # K, V, q; out written
    rows = [
        dict(
            code="-",
            variant="dense SDPA (one fused kernel, computed)",
            ops=1,
            read_bytes=dense_read,
            written_bytes=a.heads * a.dim * 2,
        )
    ]
    tables = []
    revs = [("HEAD + working tree", None)] + ([(a.old_rev, a.old_rev)] if a.old_rev else [])
    for label, rev in revs:
        sp = load_sparse(rev)
        for name, fn in variants(sp, *shape).items():
            m = measure(fn)
            rows.append(
                dict(
                    code=label,
                    variant=name,
                    **{k: m[k] for k in ("ops", "read_bytes", "written_bytes", "top")},
                )
            )
            tables.append(f"### {name} ({label})\n\n{m['table']}\n")
    meta = dict(
        command="python -m evals.lfps_cost " + shlex.join(argv if argv is not None else sys.argv[1:]),
        machine="CPU, 2 cores, shared with other jobs (meta tensors: no compute)",
        torch=torch.__version__,
        python=platform.python_version(),
        shape=dict(
            context=a.context,
            topk=a.topk,
            expand=a.expand,
            heads=a.heads,
            kv_heads=a.kv_heads,
            dim=a.dim,
            dtype=str(dtype),
            batch=1,
            spare=a.spare,
        ),
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lfps_cost.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [
        f"# LFPS decode attention, one layer: aten ops and estimated bytes (context {a.context}, "
        f"{a.heads} heads x {a.dim}, kv heads {a.kv_heads}, top-{a.topk}, expand {a.expand}, bf16)",
        "",
        f"`{meta['command']}`; {meta['machine']}; torch {meta['torch']}. Bytes: evals/op_cost.py estimates.",
        "",
        "| code | variant | aten ops | read MB | written MB | read + written vs dense |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0]["read_bytes"] + rows[0]["written_bytes"]
    for r in rows:
        tot = r["read_bytes"] + r["written_bytes"]
        lines.append(
            f"| {r['code']} | {r['variant']} | {r['ops']} | {r['read_bytes'] / 1e6:.1f} | "
            f"{r['written_bytes'] / 1e6:.1f} | {tot / base:.3f} |"
        )
    lines += ["", "## Per op, in call order", ""] + tables
    (out / "lfps_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 8 + len(rows)]))


if __name__ == "__main__":
    main()
