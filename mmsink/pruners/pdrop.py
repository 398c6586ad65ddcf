"""PyramidDrop: at the ends of stages (default layers L/4, L/2, 3L/4) keep a ratio (0.5) of the remaining
image tokens, ranked by the attention of the last instruction token at the layer before.

Budget convention (the FLOPs-matched one of the PDrop paper): the average number of visual tokens per
layer. The schedule keeps the stage layers (scaled to the model's depth) and solves the ratio; when even
a small ratio cannot reach the budget, the stages move earlier (layers scaled by 0.75, 0.5, ...)."""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import Pruner, anchor_probs, budget_fraction, register, topk_counts, topk_per_image

SCALES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)
MIN_RATIO = 0.25


def default_layers(num_layers: int, scale: float = 1.0) -> tuple[int, ...]:
    out = []
    for i in (1, 2, 3):
        s = max(1, round(scale * num_layers * i / 4))
        s = max(s, out[-1] + 1) if out else s
        out.append(min(s, num_layers - 1))
    if len(set(out)) < 3:
        raise ValueError(f"mmsink: pdrop needs at least 4 decoder layers, the model has {num_layers}")
    return tuple(out)


def mean_fraction(layers, ratio, num_layers) -> float:
    edges = (0, *layers, num_layers)
    return sum((edges[i + 1] - edges[i]) * ratio**i for i in range(4)) / num_layers


def solve_ratio(layers, target, num_layers) -> float | None:
    if not (mean_fraction(layers, 0.0, num_layers) <= target <= 1.0):
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_fraction(layers, mid, num_layers) < target else (lo, mid)
    return (lo + hi) / 2


def schedule(num_layers: int, fraction: float | None, layers=None, ratio=0.5):
    if fraction is None:
        return tuple(layers or default_layers(num_layers)), ratio
    candidates = [tuple(layers)] if layers else [default_layers(num_layers, s) for s in SCALES]
    found = None
    for cand in candidates:
        lam = solve_ratio(cand, fraction, num_layers)
        if lam is not None:
            found = (cand, lam)
            if lam >= MIN_RATIO:
                break
    if found is None:
        raise ValueError(f"mmsink: pdrop cannot reach an average of {fraction:.3f} of the visual tokens")
    return found


@register
class PDrop(Pruner):
    name = "pdrop"

    def final_layer(self, ctx):
        return max(ctx.run["layers"], default=0)  # the last stage

    @dataclasses.dataclass
    class Options:
        layers: tuple | None = None
        ratio: float = 0.5

    def check_options(self):
        if not 0.0 < self.options.ratio < 1.0:
            raise ValueError("mmsink: pdrop ratio must lie in (0, 1)")
        if self.options.layers is not None:
            ls = tuple(self.options.layers)
            if len(ls) != 3 or list(ls) != sorted(set(ls)) or ls[0] < 1:
                raise ValueError("mmsink: pdrop layers must be three increasing layer indices >= 1")

    def check_model(self, num_layers):
        if self.options.layers is not None and max(self.options.layers) >= num_layers:
            raise ValueError(
                f"mmsink: pdrop layers {self.options.layers} exceed the model's {num_layers} layers"
            )
        default_layers(num_layers)

    def start(self, ctx):
        n_img = max((n for row in ctx.layout.sizes for n in row), default=0)  # host ints: no sync
        frac = None if self.budget is None else budget_fraction(self.budget, max(n_img, 1))
        layers, ratio = schedule(ctx.num_layers, frac, self.options.layers, self.options.ratio)
        ctx.run = {"layers": layers, "ratio": ratio}

    def directive(self, ctx, layer):
        return {"observe": True} if layer + 1 in ctx.run["layers"] else None

    def after_layer(self, ctx, layer, hidden, observed):
        if layer + 1 not in ctx.run["layers"]:
            return
        score = anchor_probs(ctx, observed).mean(1)
        lam = ctx.run["ratio"]

        def k_of(orig, cur):
            return torch.where(cur > 0, torch.ceil(cur.double() * lam).long().clamp(min=1), cur)

        def k_host(orig: int, cur: int) -> int:  # k_of on host ints (the same float64 arithmetic)
            return max(1, math.ceil(cur * lam)) if cur > 0 else 0

        ctx.decide(ctx.keep_text(topk_per_image(ctx, score, k_of)), counts=topk_counts(ctx, k_host))
