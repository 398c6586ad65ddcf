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
