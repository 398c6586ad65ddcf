"""DART's selection (pivots, CPython's set order of them, each pivot's pick of the least similar image
tokens), SparseVLM's recycling (density-peak clustering and merge of the pruned tokens), PDrop's
per-stage rank and VisiPruner's per-layer test and decision run through
the pruner's own ``core.graphs.Graphed`` (issue 20: selection overhead at batch 16). On the CPU with
test_graphed.py's stand-in capture (``graphs.is_cuda`` patched to True): one capture per input signature
over 3 seeds and two batch shapes, each prefill giving exactly the eager kept sets, FLOPs and logits.
tests/test_gpu_graphed_layer_pruners.py checks a real capture."""

import pytest
import torch
from test_graphed import StandIn
from test_var import VAR
from tiny import batch, prompt, tiny_llava

import mmsink
from mmsink.core import graphs

SEEDS = [0, 1, 2]
# (method, options, the Graphed's attribute on the pruner, most signatures: batch shapes x decisions)
CASES = [
    ("dart", {"budget": 8}, "decide", 2),
    ("dart", {"budget": 0.4}, "decide", 2),
    ("dart", {"budget": 12, "budget_per": "prompt"}, "decide", 2),
    ("sparsevlm", {"budget": 12}, "merge", 6),
    ("sparsevlm", {"budget": 20, "budget_per": "prompt"}, "merge", 6),
]
ADAPTIVE = {"layer_threshold": 0.9999, "tokens_threshold": 0.03, "deep_threshold": 0.99999}
CASES += [  # PDrop's per-stage rank, VisiPruner's per-layer test and decision (most: batch shapes x stages)
    ("pdrop", {}, "rank", 6),
    ("pdrop", {"budget": 9}, "rank", 6),
    ("pdrop", {"budget": 12, "budget_per": "prompt"}, "rank", 6),
    ("visipruner", {"budget": 6}, "step", 2),
    ("visipruner", {"budget": 6, "layer_threshold": 0.9999, "mask_until_fallback": True}, "step", 2),
    ("visipruner", {"budget": 0.5, "budget_per": "prompt"}, "step", 2),
    ("visipruner", ADAPTIVE, "step", 2),  # fuses early; the deep stage's narrower layers run eagerly
    ("visipruner", {"budget": 5, "var": VAR}, "step", 2),  # the attention VAR edits: computed eagerly
]
IDS = [f"{m}-{i}" for i, (m, *_) in enumerate(CASES)]


def batches(seed: int, device=None) -> list:
    """A batch of one prompt, then a padded one of two (the second prompt with two images)."""
    one = batch([prompt(5, 7, seed=seed)], seed=seed)
    two = batch([prompt(5, 7, seed=seed), prompt(3, 9, seed=seed + 10, images=2)], seed=seed)
    if device is not None:
        one, two = ({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in (one, two))
    return [one, two]


def prefills(model, runs: list, method: str, opts: dict, attr: str, capture=None):
    """(each run's (kept indices, prefill FLOPs, last logits), the pruner's Graphed), one wrap for all."""
    mmsink.wrap(model, prune=method, **opts)
    try:
        loop = getattr(mmsink.api.get_handle(model).pruner, attr)
        if capture is not None:
            loop.capture = capture
        return outcomes(model, runs), loop
    finally:
        mmsink.unwrap(model)


def outcomes(model, runs: list) -> list:
    """Each run's (kept indices, prefill FLOPs, last logits) through the wrapped model."""
    out = []
    with torch.no_grad():
        for data in runs:
            logits = model(**data).logits[:, -1]
            st = mmsink.stats(model)
            out.append((st.kept_indices, st.prefill_flops, logits.cpu()))
    return out


def same(got: list, want: list) -> bool:
    pairs = zip(got, want)
    return len(got) == len(want) and all(g[:2] == w[:2] and torch.equal(g[2], w[2]) for g, w in pairs)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=8).float()


@pytest.mark.parametrize("method,opts,attr,most", CASES, ids=IDS)
def test_one_capture_per_signature_and_the_eager_result(model, monkeypatch, method, opts, attr, most):
    runs = [b for seed in SEEDS for b in batches(seed)]
    eager, loop = prefills(model, runs, method, opts, attr)
    assert not loop.graphs  # on the CPU: eager as such
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)  # as if the inputs were on a GPU
    monkeypatch.setattr(graphs, "capture", StandIn())  # the pruner's other Graphed loops
    cap = StandIn()
    got, loop = prefills(model, runs, method, opts, attr, cap)
    assert 2 <= cap.captures == len(loop.graphs) <= most  # no signature captured twice
    assert cap.replays >= len(runs)  # every prefill's selection replays a graph
    assert same(got, eager)
    assert len({str(k) for k, *_ in eager[::2]}) == len(SEEDS)  # the seeds keep different tokens
