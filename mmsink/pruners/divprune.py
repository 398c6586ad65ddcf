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
distance matrix per image, padded to the largest image, and one loop over the K greedy steps (on a GPU
replayed as one CUDA graph per shape and K, ``core.graphs.Graphed``)."""

from __future__ import annotations

import torch

from ..core.graphs import Graphed
from ..core.plan import Prefill
from .base import Pruner, budget_sizes, check_size, register


@register
class DivPrune(Pruner):
    name = "divprune"
    default_budget = 0.098

    def check_options(self):
        self.greedy = Graphed(divprune_greedy)  # one CUDA graph per (groups, width, steps) on a GPU

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
        picks, flops = divprune_select(groups.gather(embeds), groups.real, max(ks), self.greedy)
        ctx.extra_flops += flops
        chosen = groups.chosen(picks, self.keep_counts(groups.size))
        ctx.decide(ctx.keep_text(chosen), counts=groups.counts(ctx, ks))
        return None

    def keep_counts(self, n: torch.Tensor) -> torch.Tensor:
        """``keep_of`` on the device: n [G] long (each > 0) -> [G] long, without reading n."""
        if isinstance(self.budget, float):  # Python's round and torch.round both round half to even
            return torch.round(n.double() * self.budget).long().clamp(min=1)
        return n.clamp(max=self.budget)


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
        # the groups' sizes from the layout's counts on the device (the host's sizes are read from them):
        # no tensor built from host data, which on a GPU would wait for the queued work
        counts = lay.counts if ctx.budget_per != "prompt" else lay.counts.sum(1, keepdim=True)
        flat = counts.flatten()
        order = (flat <= 0).to(torch.uint8).argsort(stable=True)[: len(self.sizes)]  # sample by sample
        self.size = flat[order]  # [G] == self.sizes
        self.sample_index = order.div(counts.shape[1], rounding_mode="floor")  # [G] == self.sample
        start = self.size.cumsum(0) - self.size
        col = torch.arange(max(self.sizes + [1]), device=dev)
        self.real = col[None] < self.size[:, None]  # [G, n]
        self.rank = torch.where(
            self.real, start[:, None] + col[None], torch.zeros_like(self.real, dtype=torch.long)
        )
        self.flat = self.places[self.rank] if total else self.rank  # [G, n] flat index (padding: any)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, ...] -> [G, n, ...] (padding slots hold some real token: mask them with ``real``)."""
        return x.reshape(self.batch * self.length, *x.shape[2:])[self.flat]

    def chosen(self, picks: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
        """picks [G, kmax] slots of each group (the first ks[g] count, ks [G] on the device) -> [B, L]."""
        used = torch.arange(picks.shape[1], device=picks.device)[None] < ks[:, None]
        return self.mark(torch.where(used, self.flat.gather(1, picks), self.batch * self.length))

    def mark(self, where: torch.Tensor) -> torch.Tensor:
        """Flat indices (``batch * length``: none) -> [B, L] bool, True there."""
        out = torch.zeros(self.batch * self.length + 1, dtype=torch.bool, device=where.device)
        out.index_fill_(0, where.flatten(), True)  # a python-scalar index_put would build a host tensor
        return out[:-1].view(self.batch, self.length)

    def counts(self, ctx: Prefill, ks: list) -> list | None:
        """What each sample keeps, as ``Segment.counts`` (text tokens and each group's keep)."""
        if ctx.seg.counts is None:
            return None
        it = iter(ks)
        return [(t, [next(it) for n in s if n > 0]) for (t, _), s in zip(ctx.seg.counts, self.per_sample)]


def divprune_select(x: torch.Tensor, real: torch.Tensor, kmax: int, greedy=None) -> tuple[torch.Tensor, int]:
    """x [G, n, d] tokens (padding masked by ``real`` [G, n]) -> (picks [G, kmax] in greedy order, matmul
    FLOPs executed). Distances in x's dtype; ``greedy``: ``divprune_greedy`` or a ``Graphed`` of it."""
    g, n, d = x.shape
    xn = x / x.norm(dim=-1, keepdim=True)
    dist = 1.0 - torch.bmm(xn, xn.transpose(1, 2))  # [G, i, j]
    # (detached: the choice is discrete, and a graph's static copies need no autograd history)
    return (greedy or divprune_greedy)(dist.detach(), real, max(kmax, 1)), 2 * g * n * n * d


def divprune_greedy(dist: torch.Tensor, real: torch.Tensor, kmax: int) -> torch.Tensor:
    """The greedy max-min loop on dist [G, n, n] (real [G, n]) -> picks [G, kmax]. Device ops only (no
    host reads, no tensors from host data), the same ops for every input of a shape: CUDA-graph safe."""
    g, n, _ = dist.shape
    dist = dist.masked_fill(~real[:, :, None], float("inf"))  # a padding row is nobody's neighbour
    if n > 1:
        first = dist.topk(2, dim=1, largest=False).values[:, 1]  # each column's nearest other token
    else:
        first = dist.new_full((g, n), float("inf"))
    # a chosen token's own distance (the diagonal) and padding columns at -inf: the running minimum over
    # the picks' rows then excludes both, without a separate taken mask
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    dist = dist.masked_fill(eye[None] | ~real[:, None, :], float("-inf"))
    rows = torch.arange(g, device=dist.device)
    picks = [first.masked_fill(~real, float("-inf")).argmax(1)]  # ties: the first index
    nearest = None
    for _ in range(1, kmax):
        row = dist[rows, picks[-1]]  # [G, n] distances from the last pick
        nearest = row if nearest is None else torch.minimum(nearest, row)
        picks.append(nearest.argmax(1))
    return torch.stack(picks, 1)
