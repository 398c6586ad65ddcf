"""DivPrune (Alvar et al., CVPR 2025; vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``, ``DivPrune``):
max-min diversity on the visual tokens after the projector, before the LLM, question-independent.

Distance 1 - cos between an image's projected tokens (computed in the embeddings' dtype, as the official
code does in the model's). The first pick maximises the distance to its nearest neighbour (the second
smallest entry of its column, its own ~0 being the smallest); each later pick maximises its smallest
distance to the tokens already chosen; ties go to the first index (argmax). Picks are sorted back into
sequence order. Budget: an int keeps that many tokens per image; a float r keeps round(r * N) as the
official ``int(round(ratio * N))`` (Python's round, at least 1; default 0.098: 56 of 576).

LLaVA-NeXT: each image's tokens as they enter the LLM (base tile, unpadded crops and the newline tokens,
as the official code's span of ``image_features[0]``). Qwen2-VL / 2.5-VL: the merger's outputs. Several
images: each image on its own (the official code prunes a single image); ``budget_per="prompt"``: one pool
per prompt. Departures: chosen tokens are excluded from later picks (the official code leaves them in the
max, where they score ~0 and are never re-picked unless tokens are exact duplicates); kept tokens keep their
original positions (mmsink's rule for every method). All images of a batch run together: one [G, N, N]
distance matrix per image, padded to the largest image, and one loop over the K greedy steps."""

from __future__ import annotations

import torch

from ..core.plan import Prefill
from .base import Pruner, budget_sizes, check_size, register


@register
class DivPrune(Pruner):
    name = "divprune"
    default_budget = 0.098

    def final_layer(self, ctx):
        return 0  # decided before the first layer

    def keep_of(self, n: int) -> int:
        """Tokens kept of a group of ``n`` (host ints)."""
        if n == 0:
            return 0
        if isinstance(self.budget, float):
            return max(1, int(round(self.budget * n)))
        return min(self.budget, n)

    def before_llm(self, ctx: Prefill, embeds):
        groups = Groups(ctx)
        if not groups.sizes:
            return None
        check_size(self.budget, groups.sizes)
        ks = [self.keep_of(n) for n in groups.sizes]
        x = groups.gather(embeds)
        picks, flops = divprune_select(x, groups.real, ks)
        ctx.extra_flops += flops
        ctx.decide(ctx.keep_text(groups.chosen(picks, ks)), counts=groups.counts(ctx, ks))
        return None


class Groups:
    """The visual tokens of each budget group (an image, or with ``budget_per="prompt"`` a prompt's images),
    gathered from the [B, L] sequence into [G, n] slots, padded to the largest group. Built from host sizes
    and a stable sort on the device (no read): the layout's visual tokens in sequence order, sample by
    sample, are the groups' tokens one after the other."""

    def __init__(self, ctx: Prefill):
        lay = ctx.layout
        self.batch, self.length = lay.batch, lay.length
        self.per_sample = budget_sizes(ctx)  # per sample, its groups' sizes
        self.sizes = [n for s in self.per_sample for n in s if n > 0]
        self.sample = [b for b, s in enumerate(self.per_sample) for n in s if n > 0]
        total = sum(self.sizes)
        dev = lay.is_image.device
        # flat index (b * L + position) of every visual token, in sequence order
        self.places = (~lay.is_image).flatten().to(torch.uint8).argsort(stable=True)[:total]
        width = max(self.sizes + [1])
        starts, run = [], 0
        for n in self.sizes:
            starts.append(run)
            run += n
        start = torch.tensor(starts or [0], device=dev)[: len(self.sizes)]
        size = torch.tensor(self.sizes or [0], device=dev)[: len(self.sizes)]
        col = torch.arange(width, device=dev)
        self.real = col[None] < size[:, None]  # [G, n]
        self.rank = torch.where(
            self.real, start[:, None] + col[None], torch.zeros_like(self.real, dtype=torch.long)
        )
        self.flat = self.places[self.rank] if total else self.rank  # [G, n] flat index (padding: any)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, ...] -> [G, n, ...] (padding slots hold some real token: mask them with ``real``)."""
        return x.reshape(self.batch * self.length, *x.shape[2:])[self.flat]

    def chosen(self, picks: torch.Tensor, ks: list) -> torch.Tensor:
        """picks [G, kmax] slots of each group (the first ks[g] count) -> [B, L] bool."""
        dev = picks.device
        used = torch.arange(picks.shape[1], device=dev)[None] < torch.tensor(ks, device=dev)[:, None]
        where = torch.where(used, self.flat.gather(1, picks), self.batch * self.length)
        out = torch.zeros(self.batch * self.length + 1, dtype=torch.bool, device=dev)
        out[where.flatten()] = True
        return out[:-1].view(self.batch, self.length)

    def counts(self, ctx: Prefill, ks: list) -> list | None:
        """What each sample keeps, as ``Segment.counts`` (text tokens and each group's keep)."""
        if ctx.seg.counts is None:
            return None
        it = iter(ks)
        return [(t, [next(it) for n in s if n > 0]) for (t, _), s in zip(ctx.seg.counts, self.per_sample)]


def divprune_select(x: torch.Tensor, real: torch.Tensor, ks: list) -> tuple[torch.Tensor, int]:
    """x [G, n, d] tokens (padding masked by ``real`` [G, n]); ks: picks per group (host ints) ->
    (picks [G, max(ks)] in greedy order, matmul FLOPs executed). Distances in x's dtype."""
    g, n, d = x.shape
    kmax = max(ks + [1])
    xn = x / x.norm(dim=-1, keepdim=True)
    dist = 1.0 - torch.bmm(xn, xn.transpose(1, 2))  # [G, i, j]
    flops = 2 * g * n * n * d
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    dist = torch.where(real[:, :, None], dist, inf)  # a padding row is nobody's neighbour
    if n < 2:
        dist = torch.cat([dist, inf.expand(g, 1, n)], 1)
    first = dist.topk(2, dim=1, largest=False).values[:, 1]  # each column's nearest other token
    rows = torch.arange(g, device=x.device)
    picks = torch.empty(g, kmax, dtype=torch.long, device=x.device)
    taken = ~real
    score = first
    nearest = None
    for i in range(kmax):
        j = score.masked_fill(taken, float("-inf")).argmax(1)  # ties: the first index
        picks[:, i] = j
        taken = taken.clone()
        taken[rows, j] = True
        row = dist[rows, j]  # [G, n] distances from the new pick
        nearest = row if nearest is None else torch.minimum(nearest, row)
        score = nearest
    return picks, flops
