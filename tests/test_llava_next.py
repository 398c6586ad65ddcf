"""LLaVA-NeXT (anyres tiles, newline tokens, images of different sizes in one batch): the core checks."""

import pytest
import torch
from reference import run
from tiny import next_batch, next_single, tiny_llava_next
from torch.utils.flop_counter import FlopCounterMode

import mmsink

SPECS = [(4, 6, [(28, 56)]), (2, 3, [(56, 56), (28, 28)]), (3, 5, [])]
METHODS = [
    ("fastv", {"budget": 6}),
    ("fastv", {"budget": 0.3, "k": 3}),
    ("pdrop", {}),
    ("dart", {"budget": 5, "pivots": 2}),
    ("random", {"budget": 0.5}),
    ("visipruner", {"budget": 4}),
]
IDS = [f"{m}-{i}" for i, (m, _) in enumerate(METHODS)]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def data(model):
    return next_batch(model, SPECS, seed=1)


def test_keep_everything_matches_baseline(model, data):
    inputs, _ = data
    with torch.no_grad():
        ref = model(**inputs).logits
        mmsink.wrap(model, prune="fastv", budget=1.0)
        out = model(**inputs).logits
        mmsink.unwrap(model)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,opts", METHODS, ids=IDS)
def test_batched_per_sample_and_cached(model, data, method, opts):
    inputs, _ = data
    mmsink.wrap(model, prune=method, **opts)
    try:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
            for i in range(len(SPECS)):
                one = model(**next_single(inputs, SPECS, i)).logits[0, -1]
                torch.testing.assert_close(out[i], one, atol=1e-4, rtol=1e-4)
            a = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            b = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(a, b)


def test_per_image_budget_on_images_of_different_sizes(model, data):
    inputs, prompts = data
    mmsink.wrap(model, prune="fastv", budget=0.25)
    with torch.no_grad():
        model(**inputs)
    st = mmsink.stats(model)
    mmsink.unwrap(model)
    assert st.visual_tokens == [p.count(100) for p in prompts]
    # sample 1 holds two images of different token counts: each keeps a quarter of its own
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"][1:3], image_sizes=inputs["image_sizes"][1:3], return_dict=True
        ).pooler_output
    first, second = (f.shape[0] for f in feats)
    assert first != second
    assert st.kept_tokens[-1][1] == -(-first // 4) + -(-second // 4)


def test_matches_reference(model, data):
    inputs, _ = data
    single = next_single(inputs, SPECS, 0)
    with torch.no_grad():
        ref, kept = run(
            model,
            single["input_ids"][0],
            single["pixel_values"],
            "fastv",
            budget=6,
            k=2,
            num_layers=8,
            image_sizes=single["image_sizes"],
        )
        mmsink.wrap(model, prune="fastv", budget=6)
        out = model(**single).logits[0, -1]
        st = mmsink.stats(model)
        mmsink.unwrap(model)
    assert [row[0] for row in st.kept_indices] == kept
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("method,opts", [(None, {}), ("fastv", {"budget": 6}), ("visipruner", {"budget": 4})])
def test_flops_match_counter(method, opts):
    model = tiny_llava_next(attn="eager")
    inputs, _ = next_batch(model, SPECS, seed=1)
    mmsink.wrap(model, prune=method, **opts)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(**inputs)
    st = mmsink.stats(model)
    mmsink.unwrap(model)
    assert abs(st.prefill_flops - fc.get_total_flops()) <= 0.02 * fc.get_total_flops()


@pytest.mark.parametrize("method,kw", [("pool", {}), ("visionzip", {}), ("fastv", {"sink_forward": True})])
def test_refused_methods_say_why(model, method, kw):
    with pytest.raises(ValueError, match="not supported on LlavaNextForConditionalGeneration"):
        mmsink.wrap(model, prune=method, **kw)


def test_var_and_pruning(model, data):
    inputs, _ = data
    var = {"sink_dims": (3, 17, 40, 51), "tau": 2.4}
    with torch.no_grad():
        mmsink.wrap(model, prune="fastv", budget=6)
        plain = model(**inputs).logits[:, -1]
        mmsink.wrap(model, prune="fastv", budget=6, var=var)
        try:
            out = model(**inputs).logits[:, -1]
            for i in range(len(SPECS)):
                one = model(**next_single(inputs, SPECS, i)).logits[0, -1]
                torch.testing.assert_close(out[i], one, atol=1e-4, rtol=1e-4)
            a = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            b = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
        finally:
            mmsink.unwrap(model)
    assert torch.equal(a, b)
    assert (out[:2] - plain[:2]).abs().max() > 1e-4
