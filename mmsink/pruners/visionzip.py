"""VisionZip (Yang et al., CVPR 2025): inside the vision tower, question-independent.

Dominant tokens: the patch tokens the [CLS] query attends to most (mean over heads) in the vision layer
whose output feeds the projector. Contextual tokens: the remaining tokens are grouped around evenly
spaced targets by key similarity and averaged (in the feature space the projector reads). Budget split
as the paper (54+10 of 64, 108+20 of 128, 162+30 of 192): contextual = round(budget * 10 / 64).
Dominant tokens keep their positions; a merged token sits at its target's position.
The CLS row and keys come from the projections the tower computes anyway (no attention matrix)."""

from __future__ import annotations

import torch

from .base import Pruner, budget_count, register


@register
class VisionZip(Pruner):
    name = "visionzip"
    default_budget = 64 / 576
    uses_vision = True
    per_prompt_ok = False

    def start(self, ctx):
        ctx.run = {}

    # called by the handle's hooks on the feature layer's q/k projections and on the projector input
    def observe_q(self, ctx, q):
        ctx.run["q"] = q

    def observe_k(self, ctx, k):
        ctx.run["k"] = k

    def edit_features(self, ctx, features, heads: int, scale: float):
        """features [I, 1+P or P, D] projector input -> merged features; records each image's keep set."""
        q, k = ctx.run.pop("q"), ctx.run.pop("k")  # [I, 1+P, H*hd]
        n_img, n_tok, _ = k.shape
        hd = k.shape[-1] // heads
        qh = q[:, 0].view(n_img, heads, hd)
        kh = k.view(n_img, n_tok, heads, hd)
        cls_attn = torch.softmax(torch.einsum("ihd,inhd->ihn", qh.float(), kh.float()) * scale, -1).mean(1)
        ctx.extra_flops += 2 * n_img * heads * n_tok * hd
        offset = n_tok - features.shape[1]  # 1 when the class token was dropped ("default")
        score = cls_attn[:, offset:]
        metric = torch.nn.functional.normalize(
            kh[:, offset:].float().mean(2), dim=-1
        )  # keys, mean over heads
        p = score.shape[1]
        total = int(budget_count(self.budget, torch.tensor([p]))[0])
        contextual = min(round(total * 10 / 64), max(total - 1, 0))
        dominant = total - contextual
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
        ctx.run["keep"] = keep
        return out

    def before_llm(self, ctx, embeds):
        keep = ctx.run.get("keep")
        if keep is None:
            return None
        chosen = torch.zeros_like(ctx.layout.is_image)
        flat = ctx.layout.is_image.nonzero()
        chosen[flat[:, 0], flat[:, 1]] = keep.flatten()
        ctx.decide(ctx.keep_text(chosen))
        return None
