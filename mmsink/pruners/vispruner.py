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
costs one GEMM of every residual pair's cosine, the rounds reading it by index (the rounds' own a x b
matmuls where that matrix would be larger than twice the residual's features); counted in the FLOPs as
run; no attention matrix is kept. On CUDA the rounds
replay as one CUDA graph per input signature (``core.graphs.Graphed``).
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.graphs import Graphed
from ..core.pair_max import pair_max
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
        self.choose = Graphed(choose)  # one CUDA graph per input signature, eager off CUDA

    def select(self, ctx, tokens):
        t = tokens
        ok, sizes, ks = row_choices(ctx, t, self.budget)
        groups: dict = {}
        for i, key in enumerate(zip(sizes, ks)):  # rows of one size and budget run together
            groups.setdefault(key, []).append(i)
        # a group of consecutive rows is a slice; the others share one index tensor, built before any loop
        spread = [rows for rows in groups.values() if rows != list(range(rows[0], rows[-1] + 1))]
        index = torch.tensor([i for rows in spread for i in rows], device=ok.device) if spread else None
        keep, start = torch.zeros_like(ok), 0
        width = t.features.shape[-1]
        for (n, k), rows in groups.items():
            if rows in spread:
                at, start = index[start : start + len(rows)], start + len(rows)
            else:
                at = slice(rows[0], rows[-1] + 1)
            t_imp, t_div, plan = self.plan(n, k)
            chosen = self.choose(t.features[at], t.scores[at], ok[at], n, t_imp, t_div, plan)
            keep[at] = keep[at].scatter(1, chosen, True)
            if plan and gram(n - t_imp, width):  # every residual pair's product, once
                ctx.extra_flops += 2 * len(rows) * (n - t_imp) ** 2 * width
            else:
                ctx.extra_flops += sum(2 * len(rows) * la * lb * width for la, lb, _ in plan)
        return t.features, keep

    def plan(self, n: int, k: int) -> tuple:
        """(T_imp, T - T_imp, rounds) for ``n`` candidates keeping ``k``; a round: (|a|, |b|, a-tokens
        dropped), host arithmetic only (the sizes do not depend on the values)."""
        t_imp = int(k * self.options.important_ratio)
        t_div = k - t_imp
        rounds = []
        r_len = n - t_imp
        while t_div > 0 and (r := min(self.options.drop_per_round, r_len - t_div)) > 0:
            la, lb = (r_len + 1) // 2, r_len // 2
            rounds.append((la, lb, min(r, la)))
            r_len -= min(r, la)
        return t_imp, t_div, tuple(rounds)


def choose(features, scores, ok, n: int, t_imp: int, t_div: int, plan: tuple) -> torch.Tensor:
    """chosen [B, k] token indices of B rows of ``n`` candidates (``VisPrunerICCV.plan``'s rounds). No host
    reads and no host-built tensors: ``Graphed`` replays it as one CUDA graph."""
    ranked = scores.float().masked_fill(~ok, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)[:, :n]  # the candidates, by attention
    important, residual = order[:, :t_imp], order[:, t_imp:]
    if t_div <= 0:
        return important
    if not plan:  # no round: the residual is what is left
        return torch.cat([important, residual], 1)
    # fp32 at least (fp64 features stay fp64: the tests compare the two ways of scoring a round without
    # fp32's rounding, which can order two near-equal cosines either way)
    x = torch.nn.functional.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)
    width = x.shape[-1]
    xr = x.gather(1, residual[..., None].expand(-1, -1, width))  # [B, R, F]
    if gram(residual.shape[1], width):
        # every residual pair's cosine in one GEMM; a round's a x b products are its entries, read by index
        # (instead of one small fp32 GEMM per round, up to 64 per image in sequence)
        sim = torch.bmm(xr, xr.transpose(1, 2))  # [B, R, R]

        def best_of(a, b):  # [B, |a|]: each a-place's highest cosine to the b-places (one kernel on a GPU)
            return pair_max(sim, a, b)

    else:

        def best_of(a, b):
            xa, xb = (xr.gather(1, p[..., None].expand(-1, -1, width)) for p in (a, b))
            return torch.einsum("baf,bcf->bac", xa, xb).amax(-1)

    at = torch.arange(xr.shape[1], device=xr.device).expand(xr.shape[0], -1)  # places in ``residual``
    for _, _, r in plan:
        a, b = at[:, 0::2], at[:, 1::2]  # a = the even places, b = the odd ones
        rank = best_of(a, b).argsort(dim=1, descending=True, stable=True)[:, r:]
        at = torch.cat([a.gather(1, rank), b], 1)
    return torch.cat([important, residual.gather(1, at)], 1)


def gram(residual: int, width: int) -> bool:
    """Whether the rounds read one matrix of every residual pair's cosine (``choose``): where it holds no
    more floats than twice the residual's features."""
    return residual <= 2 * width
