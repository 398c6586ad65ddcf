"""SCOPE's and VisPruner's (``vispruner_iccv``) selection loops run through the pruner's own
``core.graphs.Graphed`` (issue 20: selection overhead). On the CPU with the stand-in capture of
test_graphed.py (``graphs.is_cuda`` patched to True): one capture per input signature over 3 seeds and two
batch sizes, each call keeping exactly the eager kept set; rows that keep fewer (SCOPE) and groups of rows
that are not consecutive (VisPruner) against plain per-row ports of the rules; no host sync in either
selection step. tests/test_gpu_graphed_scope_vispruner.py checks a real capture."""

import types

import pytest
import torch
from test_graphed import StandIn
from test_selection_syncs import inputs as sync_inputs
from test_selection_syncs import selection_syncs
from tiny import batch, prompt, tiny_llava

import mmsink
from mmsink.core import graphs
from mmsink.core.family import VisionTokens
from mmsink.pruners.scope import Scope
from mmsink.pruners.vispruner import VisPrunerICCV

METHODS = [("scope", 6), ("vispruner_iccv", 8)]  # vispruner at 8 of 36: four rounds
SEEDS = [0, 1, 2]


def loop_of(pruner) -> graphs.Graphed:
    return pruner.greedy if pruner.name == "scope" else pruner.choose


def batches(seed: int, device=None) -> list:
    """A batch of one image, then one of three (two prompts, the second with two images)."""
    one = batch([prompt(5, 7, seed=seed)], seed=seed)
    three = batch([prompt(5, 7, seed=seed), prompt(3, 4, seed=seed + 10, images=2)], seed=seed)
    if device is not None:
        one, three = (
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in (one, three)
        )
    return [one, three]


def kept_sets(model, runs: list, method: str, budget: int, capture=None):
    """(the keep [R, P] of each run's selection, the pruner's selection Graphed), one wrap for all runs."""
    mmsink.wrap(model, prune=method, budget=budget)
    try:
        pruner = mmsink.api.get_handle(model).pruner
        loop = loop_of(pruner)
        if capture is not None:
            loop.capture = capture
        kept, real = [], pruner.select

        def select(ctx, tokens):
            out = real(ctx, tokens)
            kept.append(out[1].clone())
            return out

        pruner.select = select
        with torch.no_grad():
            for data in runs:
                model(**data)
    finally:
        mmsink.unwrap(model)
    return kept, loop


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=4).float()


@pytest.mark.parametrize("method,budget", METHODS)
def test_one_capture_per_signature_and_the_eager_kept_set(model, monkeypatch, method, budget):
    runs = [b for seed in SEEDS for b in batches(seed)]  # batch sizes 1, 3, 1, 3, ...
    eager, loop = kept_sets(model, runs, method, budget)
    assert not loop.graphs  # on the CPU: eager as such
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)  # as if the inputs were on a GPU
    cap = StandIn()
    got, loop = kept_sets(model, runs, method, budget, cap)
    assert cap.captures == 2 and len(loop.graphs) == 2  # rows of 1 and of 3 images
    assert len(got) == len(eager) == len(runs)
    for g, e in zip(got, eager):
        assert torch.equal(g, e)
        assert (e.sum(1) == budget).all()  # it did choose: budget tokens a row
    assert len({tuple(e.flatten().tolist()) for e in eager[::2]}) == len(SEEDS)  # seeds differ


def rows_of(sizes, parts, p=32, width=12, seed=0) -> VisionTokens:
    """Rows of ``sizes`` real tokens (the rest padding) with random features and scores; ``parts``: rows
    sharing their image's budget (LLaVA-NeXT tiles)."""
    g = torch.Generator().manual_seed(seed)
    present = torch.arange(p)[None, :] < torch.tensor(sizes)[:, None]
    return VisionTokens(
        features=torch.randn(len(sizes), p, width, generator=g),
        scores=torch.rand(len(sizes), p, generator=g),
        keys=None,
        sizes=list(sizes),
        parts=list(parts),
        present=present,
        to_sequence=None,
        put=None,
    )


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def scope_row(features, saliency, n: int, k: int) -> set:
    """SCOPE's rule on one row's first ``n`` tokens, one candidate at a time (alpha 1)."""
    x = unit(features[:n])
    sim, weight, cur, chosen = x @ x.T, saliency[:n].clamp(min=0), torch.zeros(n), []
    for _ in range(k):
        gains = {j: float((sim[:, j] - cur).clamp(min=0).sum() * weight[j]) for j in range(n)}
        gains = {j: g for j, g in gains.items() if j not in chosen}
        best = max(gains, key=lambda j: (gains[j], -j))  # the first maximum
        chosen.append(best)
        cur = torch.maximum(cur, sim[best])
    return set(chosen)


def vispruner_row(features, scores, n: int, k: int, ratio=0.5, drop=8) -> set:
    """VisPruner's rule on one row's first ``n`` tokens, with lists (mmsink's odd-leftover round)."""
    order = sorted(range(n), key=lambda j: -float(scores[j]))
    t_imp = int(k * ratio)
    important, residual = order[:t_imp], order[t_imp:]
    x = unit(features)
    while (r := min(drop, len(residual) - (k - t_imp))) > 0:
        a, b = residual[0::2], residual[1::2]
        best = (x[a] @ x[b].T).max(-1).values.tolist()
        rank = sorted(range(len(a)), key=lambda i: -best[i])
        residual = [a[i] for i in rank[r:]] + b
    return set(important + residual)


CASES = [
    # SCOPE, budget 8: an image of 2 tiles (4 tokens each) and one of 4 (2 each): rows keeping fewer than
    # others (their own counts, ``kcol``)
    (Scope, scope_row, [30, 5, 30, 20, 25, 30], [2, 2, 4, 4, 4, 4], [4, 4, 2, 2, 2, 2]),
    # VisPruner, budget 8: rows 0 and 2, 1 and 3 are groups of rows apart (one index tensor), 4 and 5 a run
    (VisPrunerICCV, vispruner_row, [30, 20, 30, 20, 12, 12], [1] * 6, [8] * 6),
]


@pytest.mark.parametrize("cls,rule,sizes,parts,ks", CASES, ids=["scope", "vispruner_iccv"])
def test_uneven_rows_keep_the_rule_graphed_and_eager(monkeypatch, cls, rule, sizes, parts, ks):
    pruner = cls(budget=8)
    eager = []
    for seed in SEEDS:
        t = rows_of(sizes, parts, seed=seed)
        ctx = types.SimpleNamespace(run={}, extra_flops=0)
        keep = pruner.select(ctx, t)[1]
        want = [rule(t.features[i], t.scores[i], n, k) for i, (n, k) in enumerate(zip(sizes, ks))]
        assert [set(row.nonzero().flatten().tolist()) for row in keep] == want
        eager.append(keep)
    assert not loop_of(pruner).graphs
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)
    cap = StandIn()
    loop_of(pruner).capture = cap
    for seed, want in zip(SEEDS, eager):
        ctx = types.SimpleNamespace(run={}, extra_flops=0)
        assert torch.equal(pruner.select(ctx, rows_of(sizes, parts, seed=seed))[1], want)
    groups = len(set(zip(sizes, ks)))  # VisPruner: a loop per group (one signature each)
    assert cap.captures == (groups if cls is VisPrunerICCV else 1)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("method,budget", METHODS)
def test_no_sync_in_the_selection_step(method, budget, padded):
    found = selection_syncs(tiny_llava(layers=4), sync_inputs(padded), method, {"budget": budget})
    assert not found


@pytest.mark.parametrize("gram", [False, True], ids=["per round", "one gram"])
def test_vispruner_rounds_from_one_gram_or_per_round_keep_the_rule(monkeypatch, gram):
    """VisPruner's rounds read every residual pair's cosine from one GEMM (``vispruner.gram``: where it is no
    larger than twice the residual's features) or make each round's a x b products: both the rule's kept
    set (rows of 30, 20 and 12 tokens keeping 8: 6, 4 and 1 rounds), FLOPs counted as run."""
    from mmsink.pruners import vispruner

    monkeypatch.setattr(vispruner, "gram", lambda residual, width: gram)
    pruner = VisPrunerICCV(budget=8)
    sizes, parts, ks = [30, 20, 12, 30], [1] * 4, [8] * 4
    for seed in SEEDS:
        t = rows_of(sizes, parts, width=12, seed=seed)
        ctx = types.SimpleNamespace(run={}, extra_flops=0)
        keep = pruner.select(ctx, t)[1]
        want = [vispruner_row(t.features[i], t.scores[i], n, k) for i, (n, k) in enumerate(zip(sizes, ks))]
        assert [set(row.nonzero().flatten().tolist()) for row in keep] == want
        flops = 0
        for n, rows in ((30, 2), (20, 1), (12, 1)):
            t_imp, _, plan = pruner.plan(n, 8)
            r = n - t_imp
            flops += 2 * rows * 12 * (r * r if gram else sum(la * lb for la, lb, _ in plan))
        assert ctx.extra_flops == flops


def test_vispruner_gram_and_per_round_agree_at_llavas_size(monkeypatch):
    """At LLaVA-1.5's size (576 tokens of 1024 features keeping 64: 64 rounds) the two ways of scoring a
    round choose the same tokens, the order of the residual included. In fp64: in fp32 the two GEMMs round
    differently on some CPUs (the H200 host's, part 47), and 64 rounds turn one swapped near-tie into
    another pairing of every later round."""
    from mmsink.pruners import vispruner

    g = torch.Generator().manual_seed(3)
    shared = torch.randn(1, 1, 1024, generator=g, dtype=torch.float64)  # a common part, as a tower's have
    features = torch.randn(2, 576, 1024, generator=g, dtype=torch.float64) + 2 * shared
    scores, ok = torch.rand(2, 576, generator=g), torch.ones(2, 576, dtype=torch.bool)
    t_imp, t_div, plan = VisPrunerICCV(budget=64).plan(576, 64)
    assert len(plan) == 64 and vispruner.gram(576 - t_imp, 1024)
    got = vispruner.choose(features, scores, ok, 576, t_imp, t_div, plan)
    monkeypatch.setattr(vispruner, "gram", lambda residual, width: False)
    assert torch.equal(got, vispruner.choose(features, scores, ok, 576, t_imp, t_div, plan))
