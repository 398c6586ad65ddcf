"""SCOPE (saliency + coverage, arXiv 2510.24214): inside the vision tower, before the projector,
question-independent. Follows the official code, kinredon/SCOPE (``scope/clip_encoder.py``:
``CLIPVisionTower_SCOPE.forward`` and ``SCOPE``).

Per image: S = cosine similarity of the feature layer's patch features (CLIP layer -2, before the
projector); saliency = the [CLS] row of that layer's attention (summed over heads in the official code;
mmsink's scores are the mean, a constant factor that changes no choice). Greedy, K steps: with cur_max
starting at 0, pick the unchosen j maximising gain_j = sum_i max(0, S_ij - cur_max_i) * saliency_j **
alpha (ties: the first index), then cur_max_i = max(cur_max_i, S_ij). K = ``budget`` tokens per image
(absolute, as the official ``num_token``; a float is a fraction of the image's tokens). The kept patches
enter the LLM at their own positions ([CLS] is not kept, as in the official code).

Where mmsink knowingly differs: similarities in float32 (the official code uses the tower's dtype).
LLaVA-NeXT: per tile, as VisionZip: an int budget is the image's, shared evenly by its tiles (the official
code divides ``num_token`` by the tiles in the batch, int()), only the tokens unpadding keeps compete, and
newline tokens are dropped. Qwen2-VL / Qwen2.5-VL (no [CLS], no official code): saliency is the attention
each token receives in the last vision block (VisionZip's documented substitute) and S compares the
merger's input rows (a token's 2x2 patches, concatenated). ViT sinks (``sink_forward``) compete as any
token and are kept in any case. Selection costs one P x P similarity matmul per row (counted in the FLOPs);
no attention matrix is kept. On CUDA the greedy loop replays as one CUDA graph per input signature
(``core.graphs.Graphed``).
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.graphs import Graphed
from .base import register
from .visionzip import SinkAware, row_choices


@register
class Scope(SinkAware):
    name = "scope"
    default_budget = 64 / 576

    @dataclasses.dataclass
    class Options:
        alpha: float = 1.0  # saliency exponent (the official ALPHA, default 1)

    def check_options(self) -> None:
        a = self.options.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or a < 0:
            raise ValueError(f"mmsink: scope's alpha must be a number >= 0, got {a!r}")
        self.greedy = Graphed(greedy)  # one CUDA graph per input signature, eager off CUDA

    def select(self, ctx, tokens):
        t = tokens
        ok, sizes, ks = row_choices(ctx, t, self.budget)
        k = max(ks, default=0)
        # rows keeping different counts (images of other sizes or tile counts): their counts, built here
        # once, not inside the loop the graph replays
        kcol = None if len(set(ks)) <= 1 else torch.tensor(ks, device=ok.device)
        keep = self.greedy(t.features, t.scores, ok, kcol, k, self.options.alpha)
        r, p, f = t.features.shape
        ctx.extra_flops += 2 * r * p * p * f
        return t.features, keep


def greedy(features, saliency, ok, kcol, k: int, alpha: float = 1.0) -> torch.Tensor:
    """keep [R, P]: SCOPE's greedy choice of ``k`` tokens in each row among ``ok`` (all rows at once);
    ``kcol`` [R]: the rows' own counts where some keep fewer (None: all keep ``k``). No host reads and no
    host-built tensors: ``Graphed`` replays it as one CUDA graph."""
    r, p, _ = features.shape
    dev = features.device
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    sim = torch.einsum("rif,rjf->rij", x, x)  # [R, P, P], symmetric
    # only real tokens are covered: -inf - cur clamps to the 0 that masking a covered token's term gives
    # (a chosen token's row, read for cur, is a real token's: unchanged)
    sim.masked_fill_(~ok[:, :, None], float("-inf"))
    weight = saliency.float().clamp(min=0) ** alpha
    banned = ~ok  # not candidates, or chosen already
    cur = torch.zeros(r, p, device=dev)
    rows = torch.arange(r, device=dev)
    picks = None if kcol is None else torch.zeros(r, k, dtype=torch.long, device=dev)
    for step in range(k):
        gain = (sim - cur[:, :, None]).clamp_(min=0).sum(1).mul_(weight).masked_fill_(banned, float("-inf"))
        best = gain.argmax(1)
        banned.scatter_(1, best[:, None], True)
        torch.maximum(cur, sim[rows, best], out=cur)
        if picks is not None:
            picks[:, step] = best
    if picks is None:  # every row made its k picks, all distinct candidates
        return banned & ok
    # a row's first kcol picks are its choice (later ones, past it, go to a spare column P)
    first = torch.arange(k, device=dev)[None, :] < kcol[:, None]
    spare = torch.zeros(r, p + 1, dtype=torch.bool, device=dev)
    return spare.scatter_(1, torch.where(first, picks, p), True)[:, :p]
