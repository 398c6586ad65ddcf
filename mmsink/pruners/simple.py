"""Baselines that need no attention: none, random (pre-LLM subset) and pool (pre-LLM grid pooling)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..core.plan import Prefill
from .base import Pruner, budget_tokens, register


@register
class NoPruner(Pruner):
    """Keeps every token (the plan machinery still runs; useful as a control)."""

    name = "none"
    uses_budget = False

    def final_layer(self, ctx):
        return 0  # decided before the first layer


@register
class RandomPruner(Pruner):
    """A seeded random subset of each image's tokens, chosen before the first decoder layer.
    The draw depends only on the seed and the image's token count, never on the batch."""

    name = "random"
    default_budget = 0.5

    def final_layer(self, ctx):
        return 0  # decided before the first layer

    @dataclasses.dataclass
    class Options:
        seed: int = 0

    def before_llm(self, ctx: Prefill, embeds):
        lay = ctx.layout
        chosen = torch.zeros_like(lay.is_image)
        counts = lay.counts
        image_of = lay.image_of
        if self.budget_per == "prompt":
            counts = counts.sum(1, keepdim=True)
            image_of = torch.where(image_of >= 0, torch.zeros_like(image_of), image_of)
        for b in range(lay.batch):
            for m in range(counts.shape[1]):
                n = int(counts[b, m])
                if n == 0:
                    continue
                k = budget_tokens(self.budget, n)
                g = torch.Generator().manual_seed(self.options.seed)
                pick = torch.randperm(n, generator=g)[:k].to(embeds.device)
                where = (image_of[b] == m).nonzero().squeeze(1)
                chosen[b, where[pick]] = True
        ctx.decide(ctx.keep_text(chosen))
        return None


def pool_grid(rows: int, cols: int, k: int) -> tuple[int, int]:
    """Output grid of about k cells with the image's aspect ratio."""
    gr = max(1, min(rows, round((k * rows / cols) ** 0.5)))
    gc = max(1, min(cols, round(k / gr)))
    return gr, gc


@register
class PoolPruner(Pruner):
    """Average-pools each image's projected token grid before the LLM. The budget picks the output grid
    (about ``budget`` cells, aspect kept; 0.25 = 2x2 pooling). Each pooled token takes the original
    position of its window's centre token, so text positions are unchanged. An image made of several
    grids (LLaVA-NeXT: the base tile, the unpadded crops) pools each on its own, the budget shared in
    proportion to their cells; tokens in no grid (NeXT's newlines) are dropped."""

    name = "pool"
    default_budget = 0.25
    uses_grids = True
    per_prompt_ok = False

    def final_layer(self, ctx):
        return 0  # decided before the first layer

    def before_llm(self, ctx: Prefill, embeds):
        lay = ctx.layout
        out = embeds.clone()
        chosen = torch.zeros_like(lay.is_image)
        counts = lay.counts
        for b in range(lay.batch):
            for m in range(counts.shape[1]):
                n = int(counts[b, m])
                if n == 0:
                    continue
                grids = lay.grids[b][m]
                if isinstance(grids, tuple):  # one grid covering the image
                    grids = [(0, grids[0], grids[1], grids[1])] if grids[0] * grids[1] == n else None
                if not grids:
                    raise ValueError("mmsink: pool needs the image's token grid (rows x cols), unknown here")
                k = budget_tokens(self.budget, n)
                cells = sum(r * c for _, r, c, _ in grids)
                where = (lay.image_of[b] == m).nonzero().squeeze(1)
                for offset, rows, cols, stride in grids:  # each grid its share of the budget
                    share = max(1, round(k * rows * cols / cells))
                    at = offset + (torch.arange(rows)[:, None] * stride + torch.arange(cols)[None])
                    self.pool(
                        ctx, b, embeds, out, chosen, where[at.flatten().to(where.device)], rows, cols, share
                    )
        ctx.decide(ctx.keep_text(chosen))
        return out

    @staticmethod
    def pool(ctx, b, embeds, out, chosen, where, rows, cols, k):
        """Pool the grid of tokens ``where`` (row-major, rows x cols) to about k cells, in place."""
        gr, gc = pool_grid(rows, cols, k)
        x = embeds[b, where].T.reshape(1, -1, rows, cols).float()
        pooled = F.adaptive_avg_pool2d(x, (gr, gc))[0].flatten(1).T.to(embeds.dtype)
        r = ((torch.arange(gr) + 0.5) * rows / gr).long().clamp(max=rows - 1)
        c = ((torch.arange(gc) + 0.5) * cols / gc).long().clamp(max=cols - 1)
        centre = where[(r[:, None] * cols + c[None]).flatten().to(where.device)]
        if ctx.protected is not None:  # a protected token keeps its own embedding
            free = ~ctx.protected[b, centre]
            centre, pooled = centre[free], pooled[free]
        out[b, centre] = pooled
        chosen[b, centre] = True
