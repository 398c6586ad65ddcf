"""CDPruner's and DivPrune's greedy loops through ``core.graphs.Graphed`` (issue 20: selection overhead). On
the CPU, with the stand-in capture of tests/test_graphed.py and the inputs taken as on a GPU: a prefill's
selection is captured once per signature and replayed on every call, nothing inside the captured function
reads a device value or builds a tensor from host data (either would break or stall a CUDA graph), and the
kept sets equal the eager ones on several seeds and two batch sizes. The whole ``before_llm`` hook makes no
such sync either (on a GPU a blocking copy drains the queue mid-prefill). The loops alone also equal the
plain ports of the official rules (tests/official_prelm.py) on groups padded to a common width.
tests/test_gpu_graphed_cdpruner_divprune.py checks a real capture."""

import collections

import official_prelm as official
import pytest
import torch
from test_graphed import StandIn
from test_selection_syncs import SyncOps
from tiny import batch, prompt, tiny_llava

import mmsink
from mmsink.core import graphs
from mmsink.pruners.cdpruner import dpp_greedy
from mmsink.pruners.divprune import divprune_select
from mmsink.tools.reads import DeviceReads, selection_hooks


class Strict(StandIn):
    """The stand-in capture, also counting what would stall a graph inside the captured fn."""

    def __init__(self):
        super().__init__()
        self.syncs = collections.Counter()

    def __call__(self, fn):
        with DeviceReads() as reads, SyncOps() as ops:
            out, replay = super().__call__(fn)
        self.syncs.update(ops.seen)
        self.syncs.update({f"read at {s}": c for s, c in reads.sites.items()})
        return out, replay


CASES = [
    ("divprune", {"budget": 5}),
    ("divprune", {"budget": 0.2}),
    ("divprune", {"budget": 0.3, "budget_per": "prompt"}),
    ("cdpruner", {"budget": 5, "relevance": "embeds"}),
    ("cdpruner", {"budget": 0.2, "relevance": "none"}),
]
SEEDS = [0, 1, 2]
# two batch sizes (3 and 6 images: two signatures), every sample's images of different count or place
SMALL = [prompt(5, 7, seed=1), prompt(2, 4, seed=2, images=2)]
LARGE = SMALL + [prompt(3, 6, seed=4), prompt(6, 3, seed=5, images=2)]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=2)


def kept_sets(model, method, opts, capture=None) -> tuple[list, object]:
    """Kept indices of every (batch size, seed) prefill, in one wrap (so one ``Graphed`` sees them all)."""
    mmsink.wrap(model, prune=method, **opts)
    try:
        pruner = mmsink.api.get_handle(model).pruner
        if capture is not None:
            pruner.greedy.capture = capture
        out = []
        for prompts in (SMALL, LARGE):
            for seed in SEEDS:
                with torch.no_grad():
                    model(**batch(prompts, seed=seed))
                out.append(mmsink.stats(model).kept_indices[-1])
    finally:
        mmsink.unwrap(model)
    return out, pruner.greedy


@pytest.mark.parametrize("method,opts", CASES)
def test_prefill_selection_is_captured_once_per_signature(model, method, opts, monkeypatch):
    eager, g = kept_sets(model, method, opts)
    assert not g.graphs  # on the CPU the loop runs as such
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)  # as if the inputs were on a GPU
    cap = Strict()
    got, g = kept_sets(model, method, opts, cap)
    assert got == eager
    assert cap.captures == 2 and len(g.graphs) == 2 and not g.failed  # one per batch size
    assert cap.replays == len(SEEDS) * 2  # every prefill went through a replay
    assert not cap.syncs, cap.syncs
    assert len({str(k) for k in got}) > len(SEEDS)  # the seeds' kept sets differ (inputs are reloaded)


def test_the_strict_stand_in_sees_a_host_tensor(monkeypatch):
    """The guard can fail: a python-scalar index_put in the loop (what the loop did before) is reported."""

    def leaky(kernel, cand, kmax):
        di2 = torch.diagonal(kernel, dim1=1, dim2=2).clone()
        di2[torch.arange(kernel.shape[0]), di2.argmax(1)] = float("-inf")
        return dpp_greedy(kernel, cand, kmax)

    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)
    cap = Strict()
    g = graphs.Graphed(leaky, capture=cap)
    kernel = torch.eye(4).expand(2, 4, 4).contiguous()
    g(kernel, torch.ones(2, 4, dtype=torch.bool), 2)
    assert cap.syncs["aten.lift_fresh.default"] == 1


@pytest.mark.parametrize("method,opts", CASES)
def test_no_sync_in_the_hook(model, method, opts):
    found, calls = collections.Counter(), collections.Counter()

    def counted(fn, name):
        def run(*a, **k):
            calls[name] += 1
            with DeviceReads() as reads, SyncOps() as ops:
                out = fn(*a, **k)
            found.update(ops.seen)
            found.update({f"read at {s}": c for s, c in reads.sites.items()})
            return out

        return run

    mmsink.wrap(model, prune=method, **opts)
    try:
        with torch.no_grad(), selection_hooks(mmsink.api.get_handle(model).pruner, counted):
            model(**batch(LARGE, seed=3))
    finally:
        mmsink.unwrap(model)
    assert calls["before_llm"] == 1 and not found, found


def padded(groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_g, d] tensors -> [G, n, d] padded with random values (which ``real`` [G, n] must mask)."""
    n = max(x.shape[0] for x in groups)
    out = torch.randn(len(groups), n, groups[0].shape[1], generator=torch.Generator().manual_seed(7)) * 3
    real = torch.zeros(len(groups), n, dtype=torch.bool)
    for i, x in enumerate(groups):
        out[i, : x.shape[0]] = x
        real[i, : x.shape[0]] = True
    return out, real


SIZES = [40, 33, 9, 40, 2]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_divprune_loop_matches_the_port_on_padded_groups(seed):
    g = torch.Generator().manual_seed(seed)
    groups = [torch.randn(n, 12, generator=g) for n in SIZES]
    ks = [min(n, 10) for n in SIZES]  # small groups run out of tokens before kmax
    x, real = padded(groups)
    picks, _ = divprune_select(x, real, max(ks))
    for i, (xi, k) in enumerate(zip(groups, ks)):
        assert sorted(picks[i, :k].tolist()) == official.divprune(xi, k), i


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dpp_loop_matches_the_port_on_padded_groups(seed):
    """The port's "none" variant (relevance 1, self-similarity 1): the kernel is the cosine similarity."""
    g = torch.Generator().manual_seed(seed)
    groups = [torch.randn(n, 16, generator=g) for n in SIZES]
    ks = [min(n, 10) for n in SIZES]
    x, real = padded(groups)
    unit = x / x.norm(dim=-1, keepdim=True)
    kernel = unit @ unit.transpose(1, 2)
    kernel.diagonal(dim1=1, dim2=2).fill_(1.0)
    picks = dpp_greedy(kernel, real, max(ks))
    for i, (xi, k) in enumerate(zip(groups, ks)):
        assert sorted(picks[i, :k].tolist()) == official.cdpruner(xi[None], None, None, k)[0], i


def test_selection_ops_counts_a_replay_as_one_launch():
    """``evals/selection_ops.py --graphs``: the Graphed loop's ops inside the replay are counted apart and
    the hooks launch fewer ops than eagerly; the same plan; the module's capture and device test restored."""
    from mmsink.evals import selection_ops as so

    model = tiny_llava()
    data = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    real = graphs.is_cuda, graphs.capture
    eager = so.count(model, data, "divprune", 6)
    graphed = so.count(model, data, "divprune", 6, graphed=True)
    assert (graphs.is_cuda, graphs.capture) == real
    assert graphed["plan"] == eager["plan"]
    assert eager["in_graphs"] == 0 < graphed["in_graphs"]
    assert graphed["hook_ops"] < eager["hook_ops"]
    assert (eager["graph_launches"], graphed["graph_launches"]) == (0, 1)
