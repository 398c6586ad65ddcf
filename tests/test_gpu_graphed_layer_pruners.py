"""On a GPU: DART's selection, SparseVLM's recycling, PDrop's per-stage ranking and VisiPruner's per-layer
test and decision replayed as real CUDA graphs (the pruner's own
``core.graphs.Graphed``) give exactly the eager kept sets, FLOPs and logits: fp32 tiny LLaVA, 3 seeds,
batches of one and two prompts (one graph per signature, no failed capture). Skipped without CUDA
(tests/test_graphed_layer_pruners.py and tests/test_graphed_pdrop_visipruner.py check the routing on the
CPU with a stand-in capture)."""

import pytest
import torch
from test_graphed import capture_failures_raise
from test_graphed_layer_pruners import CASES, IDS, SEEDS, batches, prefills, same
from tiny import tiny_llava

from mmsink.core import graphs

pytestmark = pytest.mark.gpu
DEV = "cuda"


def cuda_model_and_runs():
    """fp32 tiny LLaVA on CUDA and its prefills (3 seeds, batches of one and two prompts); skips without."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return tiny_llava(layers=8).float().to(DEV), [b for seed in SEEDS for b in batches(seed, DEV)]


@pytest.mark.parametrize("method,opts,attr,most", CASES, ids=IDS)
def test_cuda_graphed_equals_eager(monkeypatch, method, opts, attr, most):
    model, runs = cuda_model_and_runs()
    with capture_failures_raise():
        got, loop = prefills(model, runs, method, opts, attr)
    assert 2 <= len(loop.graphs) <= most and not loop.failed
    monkeypatch.setattr(graphs, "on_cuda", lambda x: False)  # the same selection, eager
    eager, loop = prefills(model, runs, method, opts, attr)
    assert not loop.graphs
    assert same(got, eager)
    assert len({str(k) for k, *_ in eager[::2]}) == len(SEEDS)  # the seeds keep different tokens
