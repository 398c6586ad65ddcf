"""Controls for OrthoRank's score: ``mmsink sweep`` with sink orthogonality replaced (issue 18).

``--score random``: a seeded random score. Both forms keep their plans (the one-shot visual form's K and
budget; the per-layer form's updated fraction, its last token always updated, the rest skipping the
layer), only which tokens win changes: each call of the score draws uniform noise per token from one
generator seeded by ``--score-seed``. The score's dot products are still counted, so the FLOPs ratios
equal OrthoRank's.

``--score sink-updated``: OrthoRank's own score, except that the sink token (each sample's first real
token) ranks first, so the per-layer form updates it in every layer (OrthoRank's score is 0 there: the
sink itself always skips). It takes one of the budget's tokens.

Every other argument goes to ``mmsink sweep`` (use ``--methods orthorank`` and a separate ``--out``):

    python -m evals.orthorank_random --score random --model models/synthllava-sinks --bench synthvqa \\
        --methods orthorank --opt 'form="layers"' --budgets 0.3,0.2,0.1 --limit 150 --batch-size 8 \\
        --device cpu --out random_layers
"""

from __future__ import annotations

import argparse
import sys

import torch

from mmsink.pruners import orthorank

from . import sweep

SCORES = ("random", "sink-updated")


def patch(score: str, seed: int = 0) -> None:
    real = orthorank.orthogonality
    gen = torch.Generator().manual_seed(seed)

    def random_score(ctx, layer, hidden, which="first"):
        b, n, d = hidden.shape
        ctx.extra_flops += 2 * b * n * d  # what the real score counts, so FLOPs stay matched
        return torch.rand(b, n, generator=gen).to(ctx.device)

    def sink_first(ctx, layer, hidden, which="first"):
        if which != "first":
            raise ValueError("orthorank_random: --score sink-updated needs the default sink='first'")
        s = real(ctx, layer, hidden, which)
        first = ctx.seg.valid.float().argmax(1).to(s.device)  # as orthogonality finds the sink
        return s.scatter(1, first[:, None], 2.0)  # above any real score (at most 1)

    # select_layer and the visual form look the score up at call time
    orthorank.orthogonality = random_score if score == "random" else sink_first


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--score", required=True, choices=SCORES)
    p.add_argument("--score-seed", type=int, default=0)
    a, rest = p.parse_known_args(argv)
    patch(a.score, a.score_seed)
    return sweep.main(rest)


if __name__ == "__main__":
    sys.exit(main())
