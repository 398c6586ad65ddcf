"""``core.graphs.Graphed``: a selection loop replayed as a CUDA graph, one per input signature. On the CPU
with a stand-in capture (a replay re-runs the function on the static inputs and writes its outputs in
place, as a graph does): the static inputs are reloaded per call (never a stale result), one capture per
signature, the oldest dropped past ``keep``, the result a copy, a failed capture warned once and eager
after; off CUDA the function runs as such. tests/test_gpu_graphed.py checks a real capture."""

import contextlib
import warnings

import pytest
import torch

from mmsink.core import graphs


@contextlib.contextmanager
def capture_failures_raise():
    """A ``Graphed`` capture that fails (warned, then eager) raises instead: the GPU tests fail on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no CUDA graph")
        yield


def greedy(x, k: int):
    """A loop of small kernels (a greedy farthest-point pick), returns (picks [B, k], spread [B])."""
    b, n, _ = x.shape
    rows = torch.arange(b, device=x.device)
    dist = torch.cdist(x, x)
    best = dist.new_full((b, n), float("inf"))
    picks = torch.zeros(b, k, dtype=torch.long, device=x.device)
    j = torch.zeros(b, dtype=torch.long, device=x.device)
    for i in range(k):
        picks[:, i] = j
        best = torch.minimum(best, dist[rows, j])
        j = best.argmax(1)
    return picks, best.amax(1)


class StandIn:
    """A capture stand-in: counts captures and replays; a replay re-runs ``fn`` and copies into its first
    outputs."""

    def __init__(self, fail: bool = False):
        self.captures, self.replays, self.fail = 0, 0, fail

    def __call__(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        out = fn()

        def replay():
            self.replays += 1
            graphs.load(out, fn())

        return out, replay


@pytest.fixture
def graphed(monkeypatch):
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)  # as if the inputs were on a GPU

    def make(fn, **kw):
        cap = StandIn(kw.pop("fail", False))
        return graphs.Graphed(fn, capture=cap, **kw), cap

    return make


def test_every_call_gets_its_own_inputs_result(graphed):
    g, cap = graphed(greedy)
    for seed in range(4):
        x = torch.randn(3, 20, 5, generator=torch.Generator().manual_seed(seed))
        got, want = g(x, 6), greedy(x, 6)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert cap.captures == 1


def test_one_capture_per_signature_and_the_oldest_dropped(graphed):
    g, cap = graphed(greedy, keep=2)
    x = torch.randn(2, 10, 4)
    g(x, 3)
    g(x, 3)
    g(x, 4)  # a plain value is part of the signature
    g(torch.randn(2, 12, 4), 3)  # so is a shape: the (10, 3) graph is dropped
    assert cap.captures == 3 and len(g.graphs) == 2
    g(x, 3)
    assert cap.captures == 4


def test_the_result_is_a_copy(graphed):
    g, _ = graphed(greedy)
    x = torch.randn(2, 10, 4)
    first = g(x, 3)
    keep = first[0].clone()
    g(torch.randn(2, 10, 4), 3)
    assert torch.equal(first[0], keep)
    first[1].fill_(-1.0)
    assert torch.equal(g(x, 3)[1], greedy(x, 3)[1])


def test_a_failed_capture_warns_once_then_eager(graphed):
    g, cap = graphed(greedy, fail=True)
    x = torch.randn(2, 10, 4)
    with pytest.warns(UserWarning, match="no CUDA graph"):
        got = g(x, 3)
    assert torch.equal(got[0], greedy(x, 3)[0]) and g.failed
    cap.fail = False
    g(x, 3)
    assert cap.captures == 0


def test_off_cuda_the_function_runs_as_such():
    cap = StandIn()
    g = graphs.Graphed(greedy, capture=cap)
    x = torch.randn(2, 10, 4)
    assert torch.equal(g(x, 3)[0], greedy(x, 3)[0])
    assert cap.captures == 0 and not g.graphs
