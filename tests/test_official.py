"""mmsink keeps what each peer's official code keeps (``official.py``: plain ports of the official rules),
on tiny LLaVA models with trained-like conditions (q/k scaled by 4 in ``tiny.py``; RMSNorm weights not
all ones), several seeds, two budgets, full and grouped-query attention, a left-padded batch of prompts
of different lengths compared sample by sample with the port run on the sample alone."""

import random

import pytest
import torch
from official import dart_official, pdrop_official, visipruner_shallow_logits
from tiny import batch, prompt, tiny_llava

import mmsink
from mmsink.pruners.dart import set_order
from mmsink.pruners.pdrop import schedule

SEEDS = [0, 1, 2]
KV = [4, 2]  # kv heads: = heads (LLaVA-1.5's Llama-2), < heads (grouped-query)
MODELS: dict = {}


def model_for(seed, kv):
    """A tiny LLaVA whose RMSNorm weights are spread like a trained model's (not all ones), fp32."""
    if (seed, kv) not in MODELS:
        m = tiny_llava(layers=8, seed=seed, kv_heads=kv).float()
        g = torch.Generator().manual_seed(100 + seed)
        lm = m.model.language_model
        norms = [lm.norm] + [
            n for blk in lm.layers for n in (blk.input_layernorm, blk.post_attention_layernorm)
        ]
        with torch.no_grad():
            for n in norms:
                n.weight.copy_(0.3 + 1.4 * torch.rand(n.weight.shape, generator=g))
        MODELS[(seed, kv)] = m
    return MODELS[(seed, kv)]


def prompts(seed):
    return [prompt(5, 9, seed=seed), prompt(2, 6, seed=seed + 10), prompt(7, 4, seed=seed + 20)]


def wrapped_kept(model, inputs, **settings):
    """kept_indices [layer][sample] of one batched prefill, as the sample's own positions."""
    mmsink.wrap(model, **settings)
    try:
        with torch.no_grad():
            model(**inputs)
        st = mmsink.stats(model)
    finally:
        mmsink.unwrap(model)
    pad = (inputs["attention_mask"] == 0).sum(1).tolist()
    return [[[j - pad[i] for j in layer[i]] for i in range(len(pad))] for layer in st.kept_indices]


def samples(ps, inputs):
    """(ids, pixel values) of each sample alone, unpadded."""
    for i, p in enumerate(ps):
        yield torch.tensor(p), inputs["pixel_values"][i : i + 1]


# ---------------------------------------------------------------------------------------------- PDrop

PDROP = [
    {"layers": (2, 4, 6), "ratio": 0.5},  # the official setting, scaled to 8 layers
    {"layers": (1, 3, 6), "ratio": 0.6},  # int(N * 0.6**s): 21, 12, 7 of 36 (ceil would give 22, 13, 8)
    {"budget": 0.45},  # mmsink's FLOPs-matched budget: the schedule it solves, run officially
]


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("opts", PDROP, ids=["official", "ratio0.6", "budget"])
def test_pdrop_matches_official(seed, kv, opts):
    """Stage 1: the official code's set exactly. Every stage: the official rule with mmsink's original
    positions (the official code re-indexes positions after a drop; see the next test)."""
    model = model_for(seed, kv)
    ps = prompts(seed)
    inputs = batch(ps, seed=seed)
    layers, ratio = schedule(8, opts.get("budget"), opts.get("layers"), opts.get("ratio", 0.5))
    kept = wrapped_kept(model, inputs, prune="pdrop", **opts)
    for i, (ids, pix) in enumerate(samples(ps, inputs)):
        with torch.no_grad():
            official = pdrop_official(model, ids, pix, layers, ratio, positions="reindex")
            original = pdrop_official(model, ids, pix, layers, ratio, positions="original")
        assert kept[layers[0]][i] == official[0] == original[0]
        assert [kept[layer][i] for layer in layers] == original


def test_pdrop_positions_differ_from_official_only_after_the_first_stage():
    """Pins mmsink's one deliberate departure: positions. The official code gives the kept tokens new
    position ids 0..n-1 after each drop; mmsink keeps their original ones, so later stages rank with
    other rotary phases. The difference is real (the re-indexed rule keeps another set somewhere here)
    and mmsink follows the original-position rule everywhere."""
    differ = 0
    for seed in SEEDS:
        for kv in KV:
            model = model_for(seed, kv)
            ps = prompts(seed)
            inputs = batch(ps, seed=seed)
            kept = wrapped_kept(model, inputs, prune="pdrop", layers=(1, 3, 6), ratio=0.6)
            for i, (ids, pix) in enumerate(samples(ps, inputs)):
                with torch.no_grad():
                    official = pdrop_official(model, ids, pix, (1, 3, 6), 0.6, positions="reindex")
                    original = pdrop_official(model, ids, pix, (1, 3, 6), 0.6, positions="original")
                assert official[0] == original[0] == kept[1][i]
                assert [kept[layer][i] for layer in (1, 3, 6)] == original
                differ += official != original
    assert differ > 0


# ----------------------------------------------------------------------------------------------- DART


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("budget", [8, 16, 0.43])
def test_dart_matches_official(seed, kv, budget):
    """An int budget B is the official ``max_num_trunction`` (each of the 8 pivots takes B // 8 tokens), a
    float f the official ``1 - reduction_ratio`` (int(N * f / 8) each: 0.43 of 36 -> 1, where ceil(N * f)
    // 8 would give 2); the image keeps its 4 image pivots plus the pivots' takes."""
    model = model_for(seed, kv)
    ps = prompts(seed)
    inputs = batch(ps, seed=seed)
    kept = wrapped_kept(model, inputs, prune="dart", budget=budget)
    if isinstance(budget, int):
        args, per = {"max_num_trunction": budget}, budget // 8
    else:
        args, per = {"max_num_trunction": None, "reduction_ratio": 1 - budget}, 1
    for i, (ids, pix) in enumerate(samples(ps, inputs)):
        with torch.no_grad():
            official = dart_official(model, ids, pix, K=2, **args)
        assert len(official) == 4 + 8 * per
        assert kept[2][i] == official
        assert kept[1][i] == list(range(ps[i].index(100), ps[i].index(100) + 36))  # layers < K: all


@pytest.mark.parametrize("seed", SEEDS)
def test_dart_pivot_counts_and_layer(seed):
    """Other pivot counts and layer K map to the official ``pivot_image_token``, ``pivot_text_token``, K."""
    model = model_for(seed, 2)
    ps = prompts(seed)
    inputs = batch(ps, seed=seed)
    kept = wrapped_kept(model, inputs, prune="dart", budget=12, image_pivots=2, text_pivots=3, k=3)
    for i, (ids, pix) in enumerate(samples(ps, inputs)):
        with torch.no_grad():
            official = dart_official(model, ids, pix, 12, K=3, image_pivots=2, text_pivots=3)
        assert kept[3][i] == official


def test_set_order_is_pythons():
    """DART visits its pivots in the order Python iterates the set of their positions; mmsink reproduces
    that order on the device. Random positions, crowded table slots, and rows with fewer elements."""
    rng = random.Random(0)
    rows, valid, want = [], [], []
    while len(rows) < 400:
        kind = len(rows) % 3
        if kind == 0:
            vals = rng.sample(range(3000), 8)
        elif kind == 1:  # many share a slot of the 32-slot table, some past its linear-probe limit
            vals = list({rng.randrange(60) * 32 + rng.choice([0, 7, 22, 23, 31]) for _ in range(12)})[:8]
        else:  # crowded 8-slot table
            vals = list({rng.randrange(40) * 8 + rng.randrange(2) for _ in range(12)})[:8]
        if len(vals) < 8:
            continue
        n = rng.choice([8, 8, 5, 4, 7])
        ok = [True] * n + [False] * (8 - n)
        if len(rows) % 2:  # absent pivots anywhere in the row (DART: image pivots short, text pivots not)
            rng.shuffle(ok)
        rows.append(vals)
        valid.append(ok)
        want.append(list({v for v, o in zip(vals, ok) if o}))
    order = set_order(torch.tensor(rows), torch.tensor(valid), 3200).tolist()
    got = [[r[c] for c in o if c >= 0] for r, o in zip(rows, order)]
    assert got == want


# ------------------------------------------------------------------------------------------ VisiPruner


@pytest.mark.parametrize("rule", ["7b", "13b"])
@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_visipruner_shallow_rules_match_official(seed, kv, rule):
    """The shallow stage alone (nothing dropped): the official edit of the attention matrix (7B or 13B
    layer-0 rule, then text rows lose the image for layers < S), last-token logits of each sample of a
    left-padded batch."""
    model = model_for(seed, kv)
    ps = prompts(seed)
    inputs = batch(ps, seed=seed)
    opts = dict(middle=False, deep=False, shallow_mid_layer=2, first_layer_rule=rule)
    mmsink.wrap(model, prune="visipruner", **opts)
    try:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
    finally:
        mmsink.unwrap(model)
    for i, (ids, pix) in enumerate(samples(ps, inputs)):
        with torch.no_grad():
            ref = visipruner_shallow_logits(model, ids, pix, 2, rule)
            other = visipruner_shallow_logits(model, ids, pix, 2, "7b" if rule == "13b" else "13b")
        torch.testing.assert_close(out[i], ref, atol=2e-4, rtol=1e-4)
        assert not torch.allclose(other, ref, atol=1e-3)  # the two rules really differ here


def test_visipruner_rule_by_depth():
    """Without an option the rule follows the depth: 40 layers (13B) -> "13b", else "7b"."""
    from mmsink.pruners.visipruner import VisiPruner

    assert VisiPruner().layer0_rule(40) == "13b"
    assert VisiPruner().layer0_rule(32) == "7b"
    assert VisiPruner(first_layer_rule="13b").layer0_rule(32) == "13b"
    assert VisiPruner(first_layer_rule=False).layer0_rule(40) is None
    with pytest.raises(ValueError, match="first_layer_rule"):
        VisiPruner(first_layer_rule="70b")
