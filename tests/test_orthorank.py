"""OrthoRank as a visual-token pruner: the kept set equals a plain reference of the paper's score (1 - |cos|
to the first token's normalised state, at the states entering layer K, from the unwrapped model's own
hidden states), several seeds, budgets and layers, on every family; batched == per sample (left padding),
cached == uncached greedy decoding, executed FLOPs == FlopCounterMode."""

import math
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from tiny import (
    batch,
    counted_prefill,
    fast_and_generate,
    llava_single,
    next_batch,
    next_single,
    prompt,
    qwen_batch,
    qwen_single,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen,
)

import mmsink

P = 36  # patches per tiny LLaVA image
LLAVA_PROMPTS = [prompt(5, 7, seed=1), prompt(2, 4, seed=2, images=2), prompt(3, 5, seed=3, images=0)]
NEXT_SPECS = [(4, 6, [(28, 56)]), (2, 3, [(56, 56), (28, 28)]), (3, 5, [])]
QWEN_SPECS = [(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)]), (3, 5, [])]


FAMILIES = {
    "llava": (
        lambda attn, seed: tiny_llava(layers=4, attn=attn, seed=seed),
        lambda m: batch(LLAVA_PROMPTS, seed=4),
        lambda inputs, i: llava_single(inputs, LLAVA_PROMPTS, i),
    ),
    "llava_next": (
        lambda attn, seed: tiny_llava_next(layers=4, attn=attn, seed=seed),
        lambda m: next_batch(m, NEXT_SPECS, seed=1)[0],
        lambda inputs, i: next_single(inputs, NEXT_SPECS, i),
    ),
    "qwen2_vl": (
        lambda attn, seed: tiny_qwen("qwen2_vl", layers=4, attn=attn, seed=seed),
        lambda m: qwen_batch(QWEN_SPECS, seed=1)[0],
        lambda inputs, i: qwen_single(inputs, QWEN_SPECS, i),
    ),
    "qwen2_5_vl": (
        lambda attn, seed: tiny_qwen("qwen2_5_vl", layers=4, attn=attn, seed=seed),
        lambda m: qwen_batch(QWEN_SPECS, seed=1)[0],
        lambda inputs, i: qwen_single(inputs, QWEN_SPECS, i),
    ),
}


@cache
def built(family: str, attn: str = "sdpa", seed: int = 0):
    build, make, _ = FAMILIES[family]
    model = build(attn, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-like norm gains: the score's "normalised state" is the layer's own norm
        for blk in model.model.language_model.layers:
            w = blk.input_layernorm.weight
            w.copy_(torch.rand(w.shape, generator=g) * 1.5 + 0.25)
    return model, make(model)


def reference_keep(model, one: dict, layer: int, budget, sink="first") -> list[int]:
    """The paper's score from the plain model, one unpadded sample: per image (a run of image tokens), the
    ``budget`` tokens of highest 1 - |cos(norm(h_i), norm(h_0))|, norm = layer's input_layernorm."""
    with torch.no_grad():
        hs = model(**one, output_hidden_states=True).hidden_states[layer][0]  # entering ``layer``
        x = model.model.language_model.layers[layer].input_layernorm(hs).float()
    s0 = 0 if sink == "first" else int(hs.float().norm(dim=-1).argmax())
    ids = one["input_ids"][0].tolist()
    is_img = [t == model.config.image_token_id for t in ids]
    kept, i = [], 0
    while i < len(ids):
        if not is_img[i]:
            i += 1
            continue
        j = i
        while j < len(ids) and is_img[j]:
            j += 1
        n = j - i
        k = budget if isinstance(budget, int) else math.ceil(n * budget)
        scored = []
        for t in range(i, j):
            s = 1.0 - abs(float(F.cosine_similarity(x[t], x[s0], dim=0)))
            scored.append((-s, t))
        kept += [t for _, t in sorted(scored)[:k]]
        i = j
    return sorted(kept)


def kept_at(model, inputs, layer, **settings) -> list:
    mmsink.wrap(model, prune="orthorank", layer=layer, **settings)
    try:
        with torch.no_grad():
            model(**inputs)
        st = mmsink.stats(model)
    finally:
        mmsink.unwrap(model)
    assert all(len(st.kept_indices[j][0]) == st.visual_tokens[0] for j in range(layer))  # nothing before K
    assert all(st.kept_indices[j] == st.kept_indices[layer] for j in range(layer, len(st.kept_indices)))
    return st.kept_indices[layer][0]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layer,budget", [(1, 5), (2, 0.3), (3, 2)])
def test_keeps_the_reference_set(family, seed, layer, budget):
    model, inputs = built(family, seed=seed)
    single = FAMILIES[family][2]
    for i in range(2):  # the samples with images
        one = single(inputs, i)
        got = kept_at(model, one, layer, budget=budget)
        assert got == reference_keep(model, one, layer, budget)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("seed", [0, 1])
def test_max_norm_sink_keeps_the_reference_set(family, seed):
    model, inputs = built(family, seed=seed)
    for i in range(2):
        one = FAMILIES[family][2](inputs, i)
        got = kept_at(model, one, 2, budget=4, sink="max_norm")
        assert got == reference_keep(model, one, 2, 4, sink="max_norm")


def test_the_score_is_not_a_constant_choice():
    """The reference would also accept a rule that ignores the score if scores were flat: they are not,
    and the kept set differs from the first / last tokens of the image."""
    model, inputs = built("llava")
    one = llava_single(inputs, LLAVA_PROMPTS, 0)
    got = kept_at(model, one, 2, budget=5)
    first = one["input_ids"][0].tolist().index(100)
    assert got != list(range(first, first + 5)) and got != list(range(first + P - 5, first + P))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("opts", [{"budget": 0.5}, {"budget": 3, "layer": 1}, {"sink": "max_norm"}])
def test_batched_per_sample_and_cached(family, opts):
    model, inputs = built(family)
    single = FAMILIES[family][2]
    mmsink.wrap(model, prune="orthorank", **opts)
    try:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
            st = mmsink.stats(model)
            pad = (inputs["attention_mask"] == 0).sum(1).tolist()
            for i in range(3):
                one = model(**single(inputs, i)).logits[0, -1]
                s1 = mmsink.stats(model)
                torch.testing.assert_close(out[i], one, atol=1e-4, rtol=1e-4)
                got = [[j - pad[i] for j in layer[i]] for layer in st.kept_indices]
                assert got == [layer[0] for layer in s1.kept_indices]
            a = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            b = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(a, b)
    assert min(st.kept_tokens[-1][:2]) < max(st.visual_tokens)  # it did prune


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_flops_match_counter(family):
    model, inputs = built(family, "eager")
    st, counted = counted_prefill(model, inputs, prune="orthorank", budget=0.3)
    assert abs(st.prefill_flops - counted) <= 0.02 * counted, (st.prefill_flops, counted)
    assert st.prefill_flops < 0.95 * st.baseline_prefill_flops


@pytest.mark.parametrize("opts", [dict(budget=5), dict(form="layers", budget=0.5, layer=1)])
def test_fast_generate_equals_generate(opts):
    model, inputs = built("llava")
    fast, ref = fast_and_generate(model, inputs, prune="orthorank", **opts)
    assert torch.equal(fast, ref)


def test_bad_options():
    model, _ = built("llava")
    for bad in ({"layer": 0}, {"layer": 4}, {"layer": 1.5}, {"sink": "max"}):
        with pytest.raises(ValueError, match="orthorank"):
            mmsink.wrap(model, prune="orthorank", **bad)
