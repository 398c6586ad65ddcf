"""Where does generate_fast's time to first token go? Stage by stage, batch 1, on the GPU machine.

    python evals/ttft_breakdown.py --shape llava-next-7b --methods none,fastv:320,visionzip:320

Hooks on the model's own modules stamp the clock after a device sync (so a stage's time is its host work
plus its kernels, with no overlap between stages): before the vision tower, after it, after the projector
(VisionZip's merge runs in its pre-hook), at the first decoder layer (image features placed, the plan's
layout built), at the hand-off (layers before it ran eagerly), after the graphed tail. The synced run is
slower than a plain one; both totals are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import mmsink
from mmsink.fast import decode as fastmod
from mmsink.tools.bench import SHAPES, bench_inputs, build, timed


def stamps(model, fn) -> list:
    marks = []

    def mark(name):
        def hook(*_a, **_k):
            torch.cuda.synchronize()
            marks.append((name, time.perf_counter()))

        return hook

    inner = model.model
    hooks = [
        inner.vision_tower.register_forward_pre_hook(mark("start")),
        inner.vision_tower.register_forward_hook(mark("vision tower")),
        inner.multi_modal_projector.register_forward_hook(mark("projector (+ VisionZip merge)")),
        inner.language_model.layers[0].register_forward_pre_hook(mark("features placed, plan set up")),
    ]
    real = fastmod.FastDecoder.run_tail

    def run_tail(self, first, *a, **k):
        mark(f"layers 0..{first - 1} eager" if first else "features placed, plan set up")()
        out = real(self, first, *a, **k)
        mark(f"layers {first}.. graphed")()
        return out

    fastmod.FastDecoder.run_tail = run_tail
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        end = time.perf_counter()
    finally:
        fastmod.FastDecoder.run_tail = real
        for h in hooks:
            h.remove()
    rows, prev = [], t0
    for name, t in marks + [("to the token", end)]:
        rows.append((name, (t - prev) * 1e3))
        prev = t
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llava-next-7b", choices=sorted(SHAPES))
    ap.add_argument("--methods", default="none,fastv:320,visionzip:320")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model = build(a.shape, "cuda", torch.bfloat16)
    model.generation_config.eos_token_id = None
    inputs, _ = bench_inputs(model, 1, 35, 29, "cuda", torch.bfloat16, grid=SHAPES[a.shape].get("grid"))
    first = lambda: mmsink.generate_fast(model, max_new_tokens=1, **inputs)  # noqa: E731
    out = []
    for spec in a.methods.split(","):
        m, _, b = spec.partition(":")
        mmsink.wrap(model, prune=m, budget=int(b) if b else None)
        first()  # (and ``timed``'s own warm-up: the tail's graph is captured the second time)
        plain = timed(first, 7, torch.cuda.synchronize) * 1e3
        rows = stamps(model, first)
        stamps(model, first)  # twice: the second is reported
        rows = stamps(model, first)
        total = sum(t for _, t in rows)
        print(f"{spec}: TTFT {plain:.1f} ms (synced stages: {total:.1f} ms)")
        for name, t in rows:
            print(f"    {t:7.2f} ms  {name}")
        out.append(dict(config=spec, ttft_ms=plain, stages=rows))
    mmsink.unwrap(model)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"ttft_breakdown_{a.shape}.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
