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

from .base import Pruner, budget_count, register


@register
class VisionZip(Pruner):
    name = "visionzip"
    default_budget = 64 / 576
    uses_vision = True
    per_prompt_ok = False

    def final_layer(self, ctx):
        return 0  # decided before the first layer

    def start(self, ctx):
        ctx.run = {}

    # called by the family's hooks on the feature layer's q/k projections and on the projector input
    def observe_q(self, ctx, q):
        ctx.run["q"] = q

    def observe_k(self, ctx, k):
        ctx.run["k"] = k

    def split(self, p: int, parts: int = 1) -> tuple[int, int]:
        """(dominant, contextual) tokens kept of ``p`` tokens; ``parts``: an image's budget is shared evenly
        by that many tiles of ``p`` tokens each (LLaVA-NeXT)."""
        if isinstance(self.budget, int) and parts > 1:
            total = max(1, round(self.budget / parts))
            if total > p:
                raise ValueError(f"mmsink: budget {self.budget} is larger than {parts} tiles of {p} tokens")
        else:
            total = int(budget_count(self.budget, torch.tensor([p]))[0])
        contextual = min(round(total * 10 / 64), max(total - 1, 0))
        return total - contextual, contextual

    def edit_features(self, ctx, features, heads: int, scale: float, tiles_per_image=None, present=None):
        """``tiles_per_image`` [I]: how many tiles share each row's image budget (LLaVA-NeXT); ``present``
        [I, P] bool: tokens that reach the sequence (NeXT's unpadding drops some); only they compete."""
        """LLaVA: features [I, 1+P or P, D] projector input -> merged features; records each image's keep
        set. Dominant scores: the [CLS] query's attention at the feature layer."""
        q, k = ctx.run.pop("q"), ctx.run.pop("k")  # [I, 1+P, H*hd]
        n_img, n_tok, _ = k.shape
        hd = k.shape[-1] // heads
        qh = q[:, 0].view(n_img, heads, hd)
        kh = k.view(n_img, n_tok, heads, hd)
        cls_attn = torch.softmax(torch.einsum("ihd,inhd->ihn", qh.float(), kh.float()) * scale, -1).mean(1)
        ctx.extra_flops += 2 * n_img * heads * n_tok * hd
        offset = n_tok - features.shape[1]  # 1 when the class token was dropped ("default")
        score = cls_attn[:, offset:]
        metric = kh[:, offset:].float().mean(2)  # keys, mean over heads
        if present is None:
            out, keep = self.zip(ctx, features, score, metric)
        else:  # tile by tile, on the tokens that exist in the sequence
            out, keep = features.clone(), torch.zeros_like(present)
            for i, n in enumerate(tiles_per_image):
                rows = present[i].nonzero().squeeze(1)
                o, k = self.zip(ctx, features[i, rows][None], score[i, rows][None], metric[i, rows][None], n)
                out[i, rows] = o[0]
                keep[i, rows] = k[0]
        ctx.run["keep"] = keep
        return out

    def zip(self, ctx, features, score, metric, parts: int = 1):
        """features [I, P, F], score [I, P], metric [I, P, d] (images of one size) -> (merged features,
        keep [I, P]): the top dominant tokens by score, then the rest merged around evenly spaced targets."""
        metric = torch.nn.functional.normalize(metric, dim=-1)
        n_img, p = score.shape
        dominant, contextual = self.split(p, parts)
        out = features.clone()
        keep = torch.zeros(n_img, p, dtype=torch.bool, device=features.device)
        dom = score.topk(dominant, dim=1).indices
        keep.scatter_(1, dom, True)
        if contextual:
            rest = (~keep).float().argsort(dim=1, descending=True, stable=True)[:, : p - dominant]  # in order
            step = max(1, rest.shape[1] // contextual)
            is_target = torch.zeros(rest.shape[1], dtype=torch.bool)
            is_target[torch.arange(rest.shape[1])[::step][:contextual]] = True
            targets, others = rest[:, is_target.to(rest.device)], rest[:, ~is_target.to(rest.device)]
            mt = metric.gather(1, targets[..., None].expand(-1, -1, metric.shape[-1]))
            mo = metric.gather(1, others[..., None].expand(-1, -1, metric.shape[-1]))
            assign = torch.einsum("iod,itd->iot", mo, mt).argmax(-1)  # [I, others]
            ctx.extra_flops += 2 * n_img * mo.shape[1] * mt.shape[1] * mt.shape[2]
            f = features.float()
            sums = f.gather(1, targets[..., None].expand(-1, -1, f.shape[-1])).clone()
            counts = torch.ones(n_img, targets.shape[1], device=f.device)
            sums.scatter_add_(
                1,
                assign[..., None].expand(-1, -1, f.shape[-1]),
                f.gather(1, others[..., None].expand(-1, -1, f.shape[-1])),
            )
            counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=counts.dtype))
            merged = (sums / counts[..., None]).to(features.dtype)
            out.scatter_(1, targets[..., None].expand(-1, -1, f.shape[-1]), merged)
            keep.scatter_(1, targets, True)
        return out, keep

    def before_llm(self, ctx, embeds):
        keep = ctx.run.get("keep")  # every image's keep set, in the order of the sequence's image tokens
        if keep is None:
            return None
        chosen = torch.zeros_like(ctx.layout.is_image)
        flat = ctx.layout.is_image.nonzero()
        chosen[flat[:, 0], flat[:, 1]] = keep.flatten()
        ctx.decide(ctx.keep_text(chosen))
        return None
