"""SparseVLM's whole per-layer selection through the pruner's own ``core.graphs.Graphed`` (issue 20):
the raters (``text_slots``, ``rate``), the rater rows a decision observes (``rater_rows``), the ranking
(``rank``) and the recycling (``merge``). On the CPU with test_graphed.py's stand-in capture
(``graphs.is_cuda`` patched to True): each loop captures once per input signature and replays after,
and every prefill (3 seeds, a batch of one prompt and a padded one of two with three images) gives
exactly the eager kept sets, FLOPs and logits, for the budget options that change the graphs' inputs.
tests/test_gpu_graphed_sparsevlm.py checks real captures."""

import pytest
from test_graphed import StandIn
from test_graphed_layer_pruners import SEEDS, batches, outcomes, same
from tiny import tiny_llava

import mmsink
from mmsink.core import graphs

LOOPS = ("text_slots", "rate", "rater_rows", "rank", "merge")
OPTIONS = [
    {"budget": 12},
    {"budget": 0.3},
    {"budget": 20, "budget_per": "prompt"},
    {"budget": 12, "recycle": False},
]
IDS = ["int", "fraction", "per-prompt", "no-recycle"]


class Counted(StandIn):
    """The stand-in capture, also noting the signatures its loop is called with."""

    def __init__(self):
        super().__init__()
        self.signatures, self.calls = set(), 0

    def watch(self, loop):
        """Note the signature of each call that ``loop`` replays (keeping every graph it captures)."""
        real, loop.keep = loop.replayed, 100

        def replayed(args):
            self.calls += 1
            self.signatures.add(graphs.signature(args))
            return real(args)

        loop.replayed = replayed


def prefills(model, runs: list, opts: dict, stand_in: bool = False):
    """(each run's (kept indices, prefill FLOPs, last logits), {loop name: (Graphed, its capture)}), one
    wrap for all the runs."""
    mmsink.wrap(model, prune="sparsevlm", **opts)
    try:
        pruner = mmsink.api.get_handle(model).pruner
        loops = {name: (getattr(pruner, name), Counted()) for name in LOOPS}
        if stand_in:
            for loop, cap in loops.values():
                loop.capture = cap
                cap.watch(loop)
        return outcomes(model, runs), loops
    finally:
        mmsink.unwrap(model)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=8).float()


@pytest.mark.parametrize("opts", OPTIONS, ids=IDS)
def test_every_loop_captured_once_per_signature_and_the_eager_result(model, monkeypatch, opts):
    runs = [b for seed in SEEDS for b in batches(seed)]
    eager, loops = prefills(model, runs, opts)
    assert all(not loop.graphs for loop, _ in loops.values())  # on the CPU: eager as such
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)  # as if the inputs were on a GPU
    got, loops = prefills(model, runs, opts, stand_in=True)
    assert same(got, eager)
    assert len({str(k) for k, *_ in eager[::2]}) == len(SEEDS)  # the seeds keep different tokens
    for name, (loop, cap) in loops.items():
        if name == "merge" and opts.get("recycle") is False:
            assert cap.captures == 0  # nothing recycled: never called
            continue
        # one capture per signature (batch shapes x decisions x rater widths), every call a replay
        assert 2 <= cap.captures == len(cap.signatures) == len(loop.graphs) < cap.calls == cap.replays, name


def test_the_loops_see_their_inputs_not_the_captured_ones(model, monkeypatch):
    """A replay on another seed's batch of the same shape: the result follows the new inputs (a loop that
    kept a tensor from its capture would repeat the first seed's kept sets)."""
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)
    runs = [batches(seed)[1] for seed in SEEDS]
    got, loops = prefills(model, runs, {"budget": 12}, stand_in=True)
    assert all(cap.replays for _, cap in loops.values())
    monkeypatch.setattr(graphs, "on_cuda", lambda x: False)
    for data, g in zip(runs, got):
        alone, _ = prefills(model, [data], {"budget": 12})
        assert same([g], alone)
