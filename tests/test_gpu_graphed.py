"""On a GPU: ``core.graphs.Graphed`` with a real CUDA graph gives the eager function's result for new
inputs of a captured signature (no stale inputs or outputs), one graph per signature. Skipped without
CUDA (tests/test_graphed.py checks the mechanics on the CPU)."""

import pytest
import torch
from test_graphed import greedy

from mmsink.core import graphs

pytestmark = pytest.mark.gpu


def test_cuda_graphed_equals_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = graphs.Graphed(greedy)
    results = []
    for seed in range(5):
        x = torch.randn(4, 300, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        got, want = g(x, 32), greedy(x, 32)
        results.append(got)
        assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])
    assert len(g.graphs) == 1 and not g.failed
    assert not torch.equal(results[0][0], results[1][0])  # copies, not the graph's own outputs


def test_cuda_graphed_on_another_gpu():
    """Inputs on the second GPU while the first is current (a model split over GPUs): captured there."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    g = graphs.Graphed(greedy)
    x = torch.randn(4, 300, 16, device="cuda:1", generator=torch.Generator("cuda:1").manual_seed(0))
    with torch.cuda.device(0):
        got = g(x, 32)
    assert torch.equal(got[0], greedy(x, 32)[0]) and got[0].device == x.device
    assert len(g.graphs) == 1 and not g.failed
