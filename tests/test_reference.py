"""mmsink against a plain eager reference written from each method's spec (batch 1, full attention
matrices materialised in the test only): same kept positions at every layer, same logits."""

import pytest
import torch
from reference import run
from tiny import batch, prompt, tiny_llava

import mmsink

CASES = [
    ("fastv", {"budget": 9}, {"budget": 9, "k": 2}),
    ("fastv", {"budget": 0.25, "k": 3}, {"budget": 0.25, "k": 3}),
    ("pdrop", {"layers": (2, 4, 6), "ratio": 0.5}, {"layers": (2, 4, 6), "ratio": 0.5}),
    ("pdrop", {"layers": (1, 3, 5), "ratio": 0.6}, {"layers": (1, 3, 5), "ratio": 0.6}),
    ("dart", {"budget": 16}, {"budget": 16, "k": 2}),
    (
        "dart",
        {"budget": 10, "image_pivots": 2, "text_pivots": 3, "k": 3},
        {"budget": 10, "image_pivots": 2, "text_pivots": 3, "k": 3},
    ),
    ("random", {"budget": 7, "seed": 3}, {"budget": 7, "seed": 3}),
    ("pool", {"budget": 9}, {"budget": 9}),
    ("visionzip", {"budget": 13}, {"budget": 13}),
    ("visionzip", {"budget": 0.25}, {"budget": 0.25}),
    ("visipruner", {"budget": 6}, {"budget": 6}),
    ("visipruner", {"budget": 6, "layer_threshold": 0.9999}, {"budget": 6, "layer_threshold": 0.9999}),
    (
        "visipruner",
        {"budget": 6, "layer_threshold": 0.9999, "mask_until_fallback": True},
        {"budget": 6, "layer_threshold": 0.9999},
    ),
    (
        "visipruner",
        {"layer_threshold": 0.9999, "tokens_threshold": 0.05, "deep_threshold": 0.99999},
        {"layer_threshold": 0.9999, "tokens_threshold": 0.05, "deep_threshold": 0.99999},
    ),
    ("visipruner", {"shallow_mid_layer": 2, "budget": 5, "deep": True}, {"S": 2, "budget": 5, "deep": True}),
    (
        "visipruner",
        {"shallow_mid_layer": 2, "budget": 5, "first_layer_rule": "13b"},
        {"S": 2, "budget": 5, "first_layer_rule": "13b"},
    ),
]


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    return tiny_llava(layers=8, attn=request.param).float()


@pytest.mark.parametrize("method,opts,ref_opts", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("seed", [1, 2])
def test_matches_reference(model, method, opts, ref_opts, seed):
    p = prompt(5, 9, seed=seed)
    inputs = batch([p], seed=seed)
    ref_opts = dict(ref_opts, num_layers=8)
    with torch.no_grad():
        ref_logits, ref_kept = run(model, inputs["input_ids"][0], inputs["pixel_values"], method, **ref_opts)
        mmsink.wrap(model, prune=method, **opts)
        try:
            out = model(**inputs).logits[0, -1]
            st = mmsink.stats(model)
        finally:
            mmsink.unwrap(model)
    assert [row[0] for row in st.kept_indices] == ref_kept
    torch.testing.assert_close(out, ref_logits, atol=2e-4, rtol=1e-4)


def test_visipruner_adaptive_really_prunes(model):
    """The adaptive case above must exercise fusion and the deep stage, not a no-op."""
    p = prompt(5, 9, seed=1)
    inputs = batch([p], seed=1)
    opts = CASES[11][1]
    mmsink.wrap(model, prune="visipruner", **opts)
    with torch.no_grad():
        model(**inputs)
    st = mmsink.stats(model)
    mmsink.unwrap(model)
    counts = [row[0] for row in st.kept_tokens]
    assert counts[0] == 36 and min(counts) < 36
    assert st.extra["fusion_layer"][0] >= 2
