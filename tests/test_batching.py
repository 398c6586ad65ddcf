"""Batched == per-sample (left padding, different prompt lengths, different kept counts, several images),
and cached decoding == uncached recomputation of the pruned model."""

import pytest
import torch
from tiny import batch, llava_single, prompt, tiny_llava

import mmsink

PROMPTS = [
    prompt(5, 7, seed=1),
    prompt(2, 4, seed=2),
    prompt(4, 9, seed=3, images=2),
    prompt(3, 6, seed=4, images=0),
]
METHODS = [
    ("none", {}),
    ("fastv", {"budget": 6}),
    ("fastv", {"budget": 0.3, "k": 3}),
    ("pdrop", {}),
    ("pdrop", {"budget": 12}),
    ("dart", {"budget": 8, "image_pivots": 3, "text_pivots": 2}),
    ("random", {"budget": 0.4}),
    ("pool", {"budget": 9}),
    ("visionzip", {"budget": 10}),
    ("visipruner", {"budget": 5}),
    ("visipruner", {"budget": 5, "layer_threshold": 0.9999, "mask_until_fallback": True}),  # early, masked
    ("visipruner", {"layer_threshold": 0.9999, "tokens_threshold": 0.05, "deep_threshold": 0.99999}),
]
IDS = [f"{m}-{i}" for i, (m, _) in enumerate(METHODS)]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=8)


@pytest.fixture(scope="module")
def inputs():
    return batch(PROMPTS, seed=5)


@pytest.mark.parametrize("method,opts", METHODS, ids=IDS)
def test_batched_equals_per_sample(model, inputs, method, opts):
    mmsink.wrap(model, prune=method, **opts)
    try:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
            st = mmsink.stats(model)
            pad = (inputs["attention_mask"] == 0).sum(1).tolist()
            for i in range(len(PROMPTS)):
                one = model(**llava_single(inputs, PROMPTS, i)).logits[0, -1]
                s1 = mmsink.stats(model)
                torch.testing.assert_close(out[i], one, atol=1e-4, rtol=1e-4)
                got = [[j - pad[i] for j in layer[i]] for layer in st.kept_indices]
                assert got == [layer[0] for layer in s1.kept_indices]
    finally:
        mmsink.unwrap(model)


def test_kept_counts_differ_across_samples(model, inputs):
    """The batch really is ragged: samples keep different numbers of tokens in one forward."""
    mmsink.wrap(model, prune="random", budget=0.4)
    with torch.no_grad():
        model(**inputs)
    last = mmsink.stats(model).kept_tokens[-1]
    mmsink.unwrap(model)
    assert last == [15, 15, 30, 0]


def generate(model, inputs, **kw):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=6, return_dict_in_generate=True, output_scores=True, **kw
        )
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("method,opts", METHODS, ids=IDS)
def test_cached_equals_uncached(model, inputs, method, opts):
    mmsink.wrap(model, prune=method, **opts)
    try:
        seq_c, sc_c = generate(model, inputs, do_sample=False)
        seq_u, sc_u = generate(model, inputs, do_sample=False, use_cache=False)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(seq_c, seq_u)
    torch.testing.assert_close(sc_c, sc_u, atol=1e-4, rtol=1e-4)


def test_beam_search(model, inputs):
    """Beam search reorders the pruned cache: with a keep-everything plan (which still re-packs and uses
    the PlanCache masks) it must reproduce the bare model's beams; with pruning it runs, and
    num_beams=1 is greedy."""
    kw = dict(
        max_new_tokens=5,
        num_beams=3,
        do_sample=False,
        num_return_sequences=2,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.no_grad():
        bare = model.generate(**inputs, **kw)
        mmsink.wrap(model, prune="fastv", budget=1.0)
        try:
            same = model.generate(**inputs, **kw)
            mmsink.wrap(model, prune="visipruner", budget=5)
            pruned = model.generate(**inputs, **kw)
            greedy = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            one_beam = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=1)
        finally:
            mmsink.unwrap(model)
    assert torch.equal(same.sequences, bare.sequences)
    torch.testing.assert_close(same.sequences_scores, bare.sequences_scores, atol=1e-4, rtol=1e-4)
    assert pruned.sequences.shape == bare.sequences.shape
    assert not torch.allclose(pruned.sequences_scores, bare.sequences_scores)
    assert torch.equal(greedy, one_beam)


def test_sampling(model, inputs):
    mmsink.wrap(model, prune="fastv", budget=6)
    try:
        with torch.no_grad():
            greedy = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            top1 = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=1)
            torch.manual_seed(7)
            a = model.generate(**inputs, max_new_tokens=5, do_sample=True, temperature=1.5)
            torch.manual_seed(7)
            b = model.generate(**inputs, max_new_tokens=5, do_sample=True, temperature=1.5, use_cache=False)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(greedy, top1)
    assert torch.equal(a, b)


def test_prefill_positions_follow_original(model, inputs):
    """Kept tokens keep their original positions: the first kept layer's rotary rows equal the
    unpruned model's rows for the same tokens."""
    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault(id(mod), kwargs["position_embeddings"][0].clone())

    layers = model.model.language_model.layers
    with torch.no_grad():
        h = layers[3].register_forward_pre_hook(grab, with_kwargs=True)
        model(**inputs)
        full = seen.pop(id(layers[3]))
        h.remove()
        mmsink.wrap(model, prune="fastv", budget=6)
        h = layers[3].register_forward_pre_hook(grab, with_kwargs=True)
        model(**inputs)
        h.remove()
        st = mmsink.stats(model)
        mmsink.unwrap(model)
    pruned = seen[id(layers[3])]
    full = full.expand(len(PROMPTS), -1, -1)
    for i in range(len(PROMPTS)):
        dropped = set(st.kept_indices[0][i]) - set(st.kept_indices[3][i])
        real = range(full.shape[1] - len(PROMPTS[i]), full.shape[1])
        pos = [j for j in real if j not in dropped]
        assert len(dropped) == 30 * PROMPTS[i].count(100) // 36
        torch.testing.assert_close(pruned[i, -len(pos) :], full[i, pos])


@pytest.mark.parametrize("method", ["fastv", "random", "dart"])
def test_budget_per_prompt(model, inputs, method):
    """budget_per='prompt': a prompt's images share one budget (sample 2 has two images)."""
    mmsink.wrap(model, prune=method, budget=10, budget_per="prompt")
    with torch.no_grad():
        model(**inputs)
        per_prompt = mmsink.stats(model).kept_tokens[-1]
        mmsink.wrap(model, prune=method, budget=10)
        model(**inputs)
        per_image = mmsink.stats(model).kept_tokens[-1]
    mmsink.unwrap(model)
    want = 4 + 8 * (10 // 8) if method == "dart" else 10  # DART: its 4 image pivots + 8 pivots' B // 8 each
    assert per_prompt == [want, want, want, 0]
    assert per_image == [want, want, 2 * want, 0]


def test_budget_per_errors(model):
    with pytest.raises(ValueError, match="budget_per must be"):
        mmsink.wrap(model, prune="fastv", budget_per="batch")
    with pytest.raises(ValueError, match="budgets each image on its own"):
        mmsink.wrap(model, prune="pool", budget_per="prompt")
