"""DART: after layer K-1 pick pivot tokens (largest key norm) and keep the tokens least similar to them
(cosine on the hidden states entering layer K); no attention weights are needed.
Budget: visual tokens kept per image, pivots included (paper: K=2, 8 pivots, 128 of 576)."""

from __future__ import annotations

import dataclasses

import torch

from .base import Pruner, budget_count, budget_sizes, budget_tokens, register, topk_counts, topk_per_image


@register
class DART(Pruner):
    name = "dart"
    default_budget = 128 / 576

    def final_layer(self, ctx):
        return self.options.k  # the one decision is applied here

    @dataclasses.dataclass
    class Options:
        k: int = 2
        pivots: int = 8

    def check_options(self):
        if self.options.k < 1 or self.options.pivots < 1:
            raise ValueError("mmsink: dart needs k >= 1 and pivots >= 1")

    def check_model(self, num_layers):
        if self.options.k >= num_layers:
            raise ValueError(f"mmsink: dart k={self.options.k} must be < the model's {num_layers} layers")

    def directive(self, ctx, layer):
        return {"observe": True} if layer == self.options.k - 1 else None

    def after_layer(self, ctx, layer, hidden, observed):
        if layer != self.options.k - 1:
            return
        k = observed["k"]  # [B, Hkv, n, d]
        knorm = k.float().pow(2).sum((1, 3))  # [B, n]
        budget = self.budget
        n_piv = self.options.pivots

        def pivots_of(orig, cur):
            return torch.minimum(budget_count(budget, orig), torch.full_like(orig, n_piv))

        piv = topk_per_image(ctx, knorm, pivots_of, budget)  # [B, n]
        h = torch.nn.functional.normalize(hidden.float(), dim=-1)
        p_idx = piv.float().argsort(dim=1, descending=True, stable=True)[:, : pivot_width(ctx, budget, n_piv)]
        hp = h.gather(1, p_idx[..., None].expand(-1, -1, h.shape[-1]))
        sim = torch.einsum("bnd,bpd->bnp", h, hp)
        ctx.extra_flops += 2 * h.shape[0] * h.shape[1] * hp.shape[1] * h.shape[2]
        img, pimg = ctx.image_of(), piv.gather(1, p_idx)
        same = img[:, :, None] == ctx.image_of().gather(1, p_idx)[:, None, :]
        sim = sim.masked_fill(~(same & pimg[:, None, :]), float("-inf")).amax(-1)
        score = torch.where(piv, torch.full_like(sim, float("inf")), -sim)
        chosen = topk_per_image(ctx, score, lambda orig, cur: budget_count(budget, orig), budget)
        ctx.decide(ctx.keep_text(chosen), counts=topk_counts(ctx, lambda o, c: budget_tokens(budget, o)))


def pivot_width(ctx, budget, n_piv: int) -> int:
    """The most pivots a sample can have, from the layout's host sizes (no read): an image gives
    min(its budget, n_piv); a width past a sample's real count only adds masked columns."""
    return max([sum(min(budget_tokens(budget, n), n_piv) for n in s) for s in budget_sizes(ctx)] + [1])
