"""On a GPU: SparseVLM's whole per-layer selection (raters, rater rows, ranking, recycling) replayed as
real CUDA graphs (the pruner's own ``core.graphs.Graphed``) gives exactly the eager kept sets, FLOPs and
logits: fp32 tiny LLaVA (grouped-query attention), 3 seeds, batches of one and two prompts, the budget
options that change the graphs' inputs; every loop captured, none failed. Skipped without CUDA
(tests/test_graphed_sparsevlm.py checks the routing on the CPU with a stand-in capture)."""

import pytest
from test_gpu_graphed_layer_pruners import cuda_model_and_runs
from test_graphed import capture_failures_raise
from test_graphed_layer_pruners import SEEDS, same
from test_graphed_sparsevlm import IDS, OPTIONS, prefills

from mmsink.core import graphs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("opts", OPTIONS, ids=IDS)
def test_cuda_graphed_equals_eager(monkeypatch, opts):
    model, runs = cuda_model_and_runs()
    with capture_failures_raise():
        got, loops = prefills(model, runs, opts)
    for name, (loop, _) in loops.items():
        assert not loop.failed, name
        assert loop.graphs or (name == "merge" and opts.get("recycle") is False), name
    monkeypatch.setattr(graphs, "on_cuda", lambda x: False)  # the same selection, eager
    eager, loops = prefills(model, runs, opts)
    assert all(not loop.graphs for loop, _ in loops.values())
    assert same(got, eager)
    assert len({str(k) for k, *_ in eager[::2]}) == len(SEEDS)  # the seeds keep different tokens
