"""On a GPU: SCOPE's and VisPruner's (``vispruner_iccv``) selection loops replayed as real CUDA graphs (the
pruner's own ``core.graphs.Graphed``) keep exactly the eager kept set: fp32 tiny LLaVA, 3 seeds, batches of
1 and 3 images (one graph each, no failed capture), and rows that keep fewer or group apart. Skipped
without CUDA (tests/test_graphed_scope_vispruner.py checks the routing on the CPU)."""

import dataclasses
import types

import pytest
import torch
from test_graphed import capture_failures_raise
from test_graphed_scope_vispruner import CASES, METHODS, SEEDS, batches, kept_sets, loop_of, rows_of
from tiny import tiny_llava

from mmsink.core import graphs

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("method,budget", METHODS)
def test_cuda_graphed_kept_set_is_the_eager_one(monkeypatch, method, budget):
    model = tiny_llava(layers=4).float().to(DEV)
    runs = [b for seed in SEEDS for b in batches(seed, DEV)]
    with capture_failures_raise():
        got, loop = kept_sets(model, runs, method, budget)
    assert len(loop.graphs) == 2 and not loop.failed  # rows of 1 and of 3 images
    monkeypatch.setattr(graphs, "on_cuda", lambda x: False)  # the same loop, eager
    eager, loop = kept_sets(model, runs, method, budget)
    assert not loop.graphs and len(got) == len(eager) == len(runs)
    for g, e in zip(got, eager):
        assert torch.equal(g, e) and (e.sum(1) == budget).all()
    assert len({tuple(e.flatten().tolist()) for e in eager[::2]}) == len(SEEDS)  # seeds differ


@pytest.mark.parametrize("cls,rule,sizes,parts,ks", CASES, ids=["scope", "vispruner_iccv"])
def test_cuda_uneven_rows_graphed_equal_eager(monkeypatch, cls, rule, sizes, parts, ks):
    pruner = cls(budget=8)
    rows = []
    for seed in SEEDS:
        t = rows_of(sizes, parts, seed=seed)
        rows.append(
            dataclasses.replace(
                t, features=t.features.to(DEV), scores=t.scores.to(DEV), present=t.present.to(DEV)
            )
        )
    with capture_failures_raise():
        got = [pruner.select(types.SimpleNamespace(run={}, extra_flops=0), t)[1] for t in rows]
    assert loop_of(pruner).graphs and not loop_of(pruner).failed
    monkeypatch.setattr(graphs, "on_cuda", lambda x: False)
    for g, t in zip(got, rows):
        e = pruner.select(types.SimpleNamespace(run={}, extra_flops=0), t)[1]
        assert torch.equal(g, e)
        assert e.sum(1).tolist() == ks
