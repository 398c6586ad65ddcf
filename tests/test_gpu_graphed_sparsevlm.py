"""On a GPU: SparseVLM's whole per-layer selection (raters, rater rows, ranking, recycling) replayed as
real CUDA graphs (the pruner's own ``core.graphs.Graphed``) gives exactly the eager kept sets, FLOPs and
logits: fp32 tiny LLaVA (grouped-query attention), 3 seeds, batches of one and two prompts, the budget
options that change the graphs' inputs; every loop captured, none failed. Skipped without CUDA
(tests/test_graphed_sparsevlm.py checks the routing on the CPU with a stand-in capture)."""

import warnings

import pytest
import torch
from test_graphed_layer_pruners import SEEDS, batches, same
from test_graphed_sparsevlm import IDS, OPTIONS, prefills
from tiny import tiny_llava

from mmsink.core import graphs

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("opts", OPTIONS, ids=IDS)
def test_cuda_graphed_equals_eager(monkeypatch, opts):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_llava(layers=8).float().to(DEV)
    runs = [b for seed in SEEDS for b in batches(seed, DEV)]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no CUDA graph")  # a failed capture fails the test
        got, loops = prefills(model, runs, opts)
    for name, (loop, _) in loops.items():
        assert not loop.failed, name
        assert loop.graphs or (name == "merge" and opts.get("recycle") is False), name
    monkeypatch.setattr(graphs, "on_cuda", lambda x: False)  # the same selection, eager
    eager, loops = prefills(model, runs, opts)
    assert all(not loop.graphs for loop, _ in loops.values())
    assert same(got, eager)
    assert len({str(k) for k, *_ in eager[::2]}) == len(SEEDS)  # the seeds keep different tokens
