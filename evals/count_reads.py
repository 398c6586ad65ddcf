"""How many times does one prefill read device values (a sync each on a GPU), and where?

    python evals/count_reads.py --shape tiny-cpu --methods none,fastv:64,pdrop:64,visipruner:64

Per method: reads in ``model(...)`` (second call, after a warm one), those of mmsink's own code, and
those of ``generate_fast`` with one new token; then each site. On a CPU every read counts (host tensors
by design too); on a GPU pass ``--device cuda`` to count reads of device tensors only.
"""

from __future__ import annotations

import argparse

import torch

import mmsink
from mmsink.tools.bench import SHAPES, bench_inputs, build
from mmsink.tools.reads import DeviceReads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny-cpu", choices=sorted(SHAPES))
    ap.add_argument("--methods", default="none,fastv:64,pdrop:64,dart:64,visionzip:64,visipruner:64")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    model = build(a.shape, a.device)
    model.generation_config.eos_token_id = None
    inputs, _ = bench_inputs(model, a.batch, 35, 29, a.device, grid=SHAPES[a.shape].get("grid"))
    gpu = a.device != "cpu"
    for spec in a.methods.split(","):
        method, _, budget = spec.partition(":")
        if method != "none":
            mmsink.wrap(model, prune=method, budget=int(budget) if budget else None)
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
            with DeviceReads(device_only=gpu) as r:
                model(**inputs, logits_to_keep=1)
            mmsink.generate_fast(model, max_new_tokens=1, **inputs)
            with DeviceReads(device_only=gpu) as g:
                mmsink.generate_fast(model, max_new_tokens=1, **inputs)
        if method != "none":
            mmsink.unwrap(model)
        ours = sum(c for s, c in r.sites.items() if "/mmsink/" in s or "/patches/" in s)
        print(f"{spec}: model() {r.total} reads (mmsink {ours}), generate_fast {g.total}")
        for s, c in sorted(r.sites.items()):
            print(f"    {c} {s.split('site-packages/')[-1]}")


if __name__ == "__main__":
    main()
