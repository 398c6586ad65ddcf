"""Baselines that need no attention: none, random (pre-LLM subset) and pool (pre-LLM grid pooling)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..plan import Prefill
from .base import Pruner, budget_count, register


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
        counts = lay.image_counts()
        image_of = lay.image_of
        if self.budget_per == "prompt":
            counts = counts.sum(1, keepdim=True)
            image_of = torch.where(image_of >= 0, torch.zeros_like(image_of), image_of)
        for b in range(lay.batch):
            for m in range(counts.shape[1]):
                n = int(counts[b, m])
                if n == 0:
                    continue
                k = int(budget_count(self.budget, torch.tensor([n]))[0])
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
    position of its window's centre token, so text positions are unchanged."""

    name = "pool"
    default_budget = 0.25
    per_prompt_ok = False

    def final_layer(self, ctx):
        return 0  # decided before the first layer

    def before_llm(self, ctx: Prefill, embeds):
        lay = ctx.layout
        out = embeds.clone()
        chosen = torch.zeros_like(lay.is_image)
        counts = lay.image_counts()
        for b in range(lay.batch):
            for m in range(counts.shape[1]):
                n = int(counts[b, m])
                if n == 0:
                    continue
                grid = lay.grids[b][m]
                if grid is None or grid[0] * grid[1] != n:
                    raise ValueError("mmsink: pool needs the image's token grid (rows x cols), unknown here")
                rows, cols = grid
                k = int(budget_count(self.budget, torch.tensor([n]))[0])
                gr, gc = pool_grid(rows, cols, k)
                where = (lay.image_of[b] == m).nonzero().squeeze(1)
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
        ctx.decide(ctx.keep_text(chosen))
        return out
