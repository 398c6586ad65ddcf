"""PDrop's per-stage ranking (RoPE, the anchor row's softmax, each image's top-k: ``pdrop.rank_and_pick``)
and VisiPruner's per-layer contribution test and decision (``visipruner.observe_step``) run through the
pruner's own ``core.graphs.Graphed`` (issue 20: selection overhead at batch 16). On the CPU with
test_graphed.py's stand-in capture (``graphs.is_cuda`` patched to True): one capture per input signature
over 3 seeds and two batch shapes, replays for the other calls, each prefill giving exactly the eager kept
sets, FLOPs and logits: their cases are in tests/test_graphed_layer_pruners.py; here the check that the
comparison can fail and each function alone against eager. tests/test_gpu_graphed_layer_pruners.py
checks a real capture."""

import pytest
import torch
from test_graphed import StandIn
from test_graphed_layer_pruners import SEEDS, batches, prefills, same
from tiny import tiny_llava
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mmsink.core import graphs
from mmsink.pruners import pdrop, visipruner


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=8).float()


def test_a_stale_replay_would_be_seen(model, monkeypatch):
    """test_graphed_layer_pruners' comparison can fail: a replay that ignores its new inputs (the first
    capture's result every time) changes the kept sets."""
    runs = [b for seed in SEEDS for b in batches(seed)]
    eager, _ = prefills(model, runs, "pdrop", {"budget": 9}, "rank")
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)

    def frozen(fn):
        out = fn()
        return out, lambda: None

    got, _ = prefills(model, runs, "pdrop", {"budget": 9}, "rank", frozen)
    assert not same(got, eager)


def inputs_pdrop(seed: int, b: int, n: int = 23, h: int = 4, hkv: int = 2, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, 1, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    cos, sin = torch.randn(b, n, d, generator=g), torch.randn(b, n, d, generator=g)
    anchor = torch.randint(n - 4, n, (b,), generator=g)
    prompt = torch.arange(n)[None] <= anchor[:, None]
    img = torch.full((b, n), -1)
    img[:, 2:10], img[:, 12:18] = 0, 1
    orig = torch.tensor([[8, 6]]).expand(b, 2)
    return q, k, cos, sin, anchor, prompt, img, orig


def inputs_visipruner(seed: int, b: int, n: int = 23, h: int = 4, hkv: int = 2, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    prompt = torch.ones(b, n, dtype=torch.bool)
    vis = torch.zeros(b, n, dtype=torch.bool)
    vis[:, 3:15] = True
    fused = torch.randint(-1, 3, (b,), generator=g)
    deep = (torch.randint(0, 2, (b,), generator=g), torch.rand(b, generator=g) < 0.3)
    first = torch.arange(n)[None] < 4
    return q, k, v, prompt, vis, fused, deep, ((vis, first.expand(b, n)),)


@pytest.mark.parametrize("b", [1, 5])
def test_the_functions_replayed_equal_eager(monkeypatch, b):
    """The graphed functions alone, 3 seeds at each batch size: one capture each, then replays whose
    results are the eager function's on the new inputs (and differ between seeds)."""
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)
    cap_p, cap_v = StandIn(), StandIn()
    rank = graphs.Graphed(pdrop.rank_and_pick, capture=cap_p)
    step = graphs.Graphed(visipruner.observe_step, capture=cap_v)
    seen = []
    for seed in range(3):
        args = (*inputs_pdrop(seed, b), apply_rotary_pos_emb, 0.35, 0.25, False)
        got, want = rank(*args), pdrop.rank_and_pick(*args)
        assert torch.equal(got, want) and int(want.sum()) == b * (2 + 1)  # int(8 / 4) + int(6 / 4) each
        seen.append(got)
        q, k, v, prompt, vis, fused, deep, images = inputs_visipruner(seed, b)
        layer = torch.arange(8)[4]
        limits = (0.99, 0.2, 0.999, 2)
        # a fixed budget at its fallback (every sample fuses: its top 4), then the adaptive deep stage
        for f, im, dp, fb in ((torch.full_like(fused, -1), images, None, 4), (fused, None, deep, None)):
            args = (q, k, v, None, prompt, vis, vis.any(1), f, layer, dp, im, 0.3, limits, fb)
            got, want = step(*args), visipruner.observe_step(*args)
            assert all(torch.equal(x, y) for x, y in zip(got[:3], want[:3]))
            assert (got[3] is None) == (want[3] is None)
            if want[3] is not None:
                assert all(torch.equal(x, y) for x, y in zip(got[3], want[3]))
            if im is not None:
                assert int(got[0].sum()) == 4 * b and bool((got[1] == 4).all())
                seen.append(got[0])
    assert cap_p.captures == 1 and cap_v.captures == 2
    assert all(not torch.equal(seen[i], seen[i + 2]) for i in range(2))  # the seeds give other results
