"""VisionZip (Yang et al., CVPR 2025): inside the vision tower, question-independent.

Dominant tokens: the tokens the vision layer feeding the projector attends to most. With a [CLS] token
(LLaVA) that is the [CLS] query's attention, mean over heads. Without one (Qwen2-VL / Qwen2.5-VL) it is
the attention each token receives, mean over heads and over the queries of its image (the paper's rule
for towers without [CLS]), taken per merged token (mean over its patches). Contextual tokens: the
remaining tokens are grouped around evenly spaced targets by key similarity and averaged (in the feature
space the projector reads). Budget split as the paper (54+10 of 64, 108+20 of 128, 162+30 of 192):
contextual = round(budget * 10 / 64). Dominant tokens keep their positions; a merged token sits at its
target's position. Scores come from the projections the tower computes anyway (no attention matrix is
kept; the [CLS] row or chunks of query rows are recomputed and counted in the FLOPs).
"""

from __future__ import annotations

import torch

from .base import VisionPruner, budget_tokens, per_image, register


@register
class VisionZip(VisionPruner):
    name = "visionzip"
    default_budget = 64 / 576

    def split(self, p: int, parts: int = 1) -> tuple[int, int]:
        """(dominant, contextual) tokens kept of ``p`` tokens; ``parts``: an image's budget is shared evenly
        by that many tiles of ``p`` tokens each (LLaVA-NeXT)."""
        if isinstance(self.budget, int) and parts > 1:
            total = max(1, round(self.budget / parts))
            if total > p:
                raise ValueError(f"mmsink: budget {self.budget} is larger than {parts} tiles of {p} tokens")
        else:
            total = budget_tokens(self.budget, p)
        contextual = min(round(total * 10 / 64), max(total - 1, 0))
        return total - contextual, contextual

    def select(self, ctx, tokens):
        t = tokens
        return self.zip(ctx, t.features, t.scores, t.keys, t.parts, t.present, t.sizes)

    def zip(self, ctx, features, score, metric, parts=None, present=None, sizes=None):
        """features [I, P, F], score [I, P], metric [I, P, d] -> (merged features, keep [I, P]): per row the
        top dominant tokens by score, then the rest merged around evenly spaced targets. ``present`` [I, P]:
        only these tokens compete (the others pass through untouched); ``parts`` [I]: how many tiles share
        each row's image budget; ``sizes``: present tokens per row (read from ``present`` if not given). All
        rows at once (rows may differ in size and budget)."""
        n_img, p = score.shape
        dev = features.device
        if present is None:
            sizes = [p] * n_img
        elif sizes is None:
            sizes = present.sum(1).tolist()  # one read: budgets depend on each tile's size
        parts = parts if parts is not None else [1] * n_img
        splits = [self.split(n, m) for n, m in zip(sizes, parts)]
        steps = [max(1, (n - d) // c) if c else 1 for n, (d, c) in zip(sizes, splits)]

        def per_row(x):  # a number when every row agrees (no host-to-device copy), else a column [I, 1]
            return x[0] if len(set(x)) == 1 else torch.tensor(x, device=dev).view(-1, 1)

        dominant, contextual, step = (
            per_row([d for d, _ in splits]),
            per_row([c for _, c in splits]),
            per_row(steps),
        )
        dom_max, ctx_max = max(d for d, _ in splits), max(c for _, c in splits)
        record_kept(ctx, sizes, splits, steps, parts)
        ok = torch.ones(n_img, p, dtype=torch.bool, device=dev) if present is None else present
        metric = torch.nn.functional.normalize(metric, dim=-1)
        top = score.masked_fill(~ok, float("-inf")).topk(dom_max, dim=1).indices
        keep = torch.zeros(n_img, p, dtype=torch.bool, device=dev)
        keep.scatter_(1, top, (torch.arange(dom_max, device=dev)[None] < dominant).expand(n_img, -1))
        out = features.clone()
        if not ctx_max:
            return out, keep
        # the rest, in order: every step-th of them is a target (the first ``contextual``), the others merge
        rest = ok & ~keep
        rank = rest.long().cumsum(1) - 1
        target = rest & (rank % step == 0) & (rank // step < contextual)
        others = rest & ~target
        slot = torch.where(target, rank // step, ctx_max)  # a target's column; the rest write a spare one
        cols = torch.full((n_img, ctx_max + 1), p, dtype=torch.long, device=dev)
        cols.scatter_(1, slot, torch.arange(p, device=dev).expand(n_img, -1))
        cols = cols[:, :ctx_max]  # target positions [I, C]; p where a row has fewer targets
        real = cols < p
        pad = torch.nn.functional.pad
        mt = pad(metric, (0, 0, 0, 1)).gather(1, cols[..., None].expand(-1, -1, metric.shape[-1]))
        sim = torch.einsum("ipd,icd->ipc", metric, mt).masked_fill(~real[:, None], float("-inf"))
        assign = sim.argmax(-1)  # [I, P] the target each token would join
        ctx.extra_flops += 2 * n_img * p * ctx_max * metric.shape[-1]
        f = pad(features.float(), (0, 0, 0, 1))
        sums = f.gather(1, cols[..., None].expand(-1, -1, f.shape[-1]))
        sums.scatter_add_(1, assign[..., None].expand(-1, -1, f.shape[-1]), f[:, :p] * others[..., None])
        counts = real.float().scatter_add_(1, assign, others.float())
        merged = (sums / counts.clamp(min=1)[..., None]).to(features.dtype)
        out = pad(out, (0, 0, 0, 1)).scatter_(1, cols[..., None].expand(-1, -1, f.shape[-1]), merged)[:, :p]
        return out, keep | target


def record_kept(ctx, sizes, splits, steps, parts) -> None:
    """Tokens each image keeps, on the host, appended to ``ctx.run["kept_images"]`` (None once unknown):
    per row its dominant tokens and its targets (every step-th of the rest, at most ``contextual``), the
    rows of an image (its tiles) summed. Unknown when a row has fewer tokens than dominant picks."""
    if "kept_images" in ctx.run and ctx.run["kept_images"] is None:
        return
    if any(n < d for n, (d, _) in zip(sizes, splits)):
        ctx.run["kept_images"] = None
        return
    rows = [d + (min(c, -(-(n - d) // st)) if c else 0) for n, (d, c), st in zip(sizes, splits, steps)]
    ctx.run.setdefault("kept_images", []).extend(per_image(rows, parts))
