"""FastV: after layer K-1, keep the image tokens the last prompt token attends to most (mean over heads);
layers K.. run on the kept tokens. Budget: visual tokens kept per image (paper: K=2, R=50%)."""

from __future__ import annotations

import dataclasses

from .base import Pruner, anchor_probs, budget_count, budget_tokens, register, topk_counts, topk_per_image


@register
class FastV(Pruner):
    name = "fastv"
    default_budget = 0.5

    def final_layer(self, ctx):
        return self.options.k  # the one decision is applied here

    @dataclasses.dataclass
    class Options:
        k: int = 2

    def check_options(self):
        if self.options.k < 1:
            raise ValueError("mmsink: fastv needs k >= 1 (tokens are ranked at layer k-1)")

    def check_model(self, num_layers):
        if self.options.k >= num_layers:
            raise ValueError(f"mmsink: fastv k={self.options.k} must be < the model's {num_layers} layers")

    def directive(self, ctx, layer):
        return {"observe": True} if layer == self.options.k - 1 else None

    def after_layer(self, ctx, layer, hidden, observed):
        if layer != self.options.k - 1:
            return
        score = anchor_probs(ctx, observed).mean(1)
        chosen = topk_per_image(ctx, score, lambda orig, cur: budget_count(self.budget, orig), self.budget)
        ctx.decide(ctx.keep_text(chosen), counts=topk_counts(ctx, lambda o, c: budget_tokens(self.budget, o)))
