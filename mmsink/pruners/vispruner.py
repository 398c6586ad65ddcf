"""VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs", arXiv 2412.01818), registered as ``vispruner_iccv``. NOT VisiPruner (the seed
paper's method, ``visipruner``): a different method with a similar name. Inside the vision tower, before
the projector, question-independent. Follows the official code, Theia-4869/VisPruner
(``llava/model/llava_arch.py``: ``encode_images``; ``llava/model/multimodal_encoder/clip_encoder.py``:
``feature_select``).

Per image, T = ``budget`` tokens: T_imp = int(T * important_ratio) important tokens, the highest [CLS]
attention of the feature layer (CLIP layer -2, mean over heads); the remaining tokens, in descending
attention order, are the residual. While more than T - T_imp residual tokens remain, a round splits them
alternately into a (even places) and b (odd places), scores each a-token by its highest cosine
similarity (feature-layer patch features, before the projector) to b, drops the r = min(8, R - (T -
T_imp)) highest, and continues with the other a-tokens (in descending score order) followed by b. Kept:
the important tokens and the last residual, at their own positions ([CLS] is not kept, as there).

Where mmsink knowingly differs: the official round fails when the residual count R is odd (a has one
token more than b and its gather is sized R // 2 - r): mmsink keeps the len(a) - r other a-tokens, which
is the same round whenever R is even (then it matches the official code token for token) and never
drops more than r. Cosines in float32. LLaVA-NeXT: per tile, as VisionZip: an int budget is the image's,
shared evenly by its tiles (the official code gives every tile T), only the tokens unpadding keeps
compete, and newline tokens are dropped (the official code keeps them). Qwen2-VL / Qwen2.5-VL (no [CLS],
no official code): the importance is the attention each token receives in the last vision block
(VisionZip's documented substitute), cosines on the merger's input rows (a token's 2x2 patches,
concatenated). ViT sinks (``sink_forward``) compete as any token and are kept in any case. Selection
costs the rounds' a x b matmuls (counted in the FLOPs); no attention matrix is kept.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import register
from .visionzip import SinkAware, row_choices


@register
class VisPrunerICCV(SinkAware):
    """VisPruner (ICCV'25, Theia-4869/VisPruner) - not VisiPruner (``visipruner``)."""

    name = "vispruner_iccv"
    default_budget = 64 / 576

    @dataclasses.dataclass
    class Options:
        important_ratio: float = 0.5  # share of T taken by [CLS] attention (the official default)
        drop_per_round: int = 8  # a-tokens dropped per round at most (the official 8)

    def check_options(self) -> None:
        r, d = self.options.important_ratio, self.options.drop_per_round
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"mmsink: vispruner_iccv's important_ratio must lie in [0, 1], got {r!r}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"mmsink: vispruner_iccv's drop_per_round must be an int >= 1, got {d!r}")

    def select(self, ctx, tokens):
        t = tokens
        ok, sizes, ks = row_choices(ctx, t, self.budget)
        keep = torch.zeros_like(ok)
        groups: dict = {}
        for i, key in enumerate(zip(sizes, ks)):  # rows of one size and budget run together
            groups.setdefault(key, []).append(i)
        for (n, k), rows in groups.items():
            idx = torch.tensor(rows, device=ok.device)
            chosen, flops = self.rows(t.features[idx], t.scores[idx], ok[idx], n, k)
            keep[idx] = keep[idx].scatter(1, chosen, True)
            ctx.extra_flops += flops
        return t.features, keep

    def rows(self, features, scores, ok, n: int, k: int):
        """(chosen [B, k] token indices, matmul FLOPs) for B rows of ``n`` candidates keeping ``k``."""
        b = features.shape[0]
        t_imp = int(k * self.options.important_ratio)
        t_div = k - t_imp
        ranked = scores.float().masked_fill(~ok, float("-inf"))
        order = ranked.argsort(dim=1, descending=True, stable=True)[:, :n]  # the candidates, by attention
        important, residual = order[:, :t_imp], order[:, t_imp:]
        if t_div <= 0:
            return important, 0
        x = torch.nn.functional.normalize(features.float(), dim=-1)
        width = x.shape[-1]
        flops = 0
        while True:
            r_len = residual.shape[1]
            r = min(self.options.drop_per_round, r_len - t_div)
            if r <= 0:
                break
            a, bb = residual[:, 0::2], residual[:, 1::2]
            xa = x.gather(1, a[..., None].expand(-1, -1, width))
            xb = x.gather(1, bb[..., None].expand(-1, -1, width))
            best = torch.einsum("baf,bcf->bac", xa, xb).amax(-1)  # [B, |a|]
            flops += 2 * b * a.shape[1] * bb.shape[1] * width
            rank = best.argsort(dim=1, descending=True, stable=True)[:, min(r, a.shape[1]) :]
            residual = torch.cat([a.gather(1, rank), bb], 1)
        return torch.cat([important, residual], 1), flops
