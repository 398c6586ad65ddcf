"""LLaVA-NeXT specifics: per-image budgets on images of different sizes, the eager reference, refused
methods, VAR (the shared contract: test_families.py)."""

import pytest
import torch
from reference import run
from tiny import next_batch, next_single, tiny_llava_next

import mmsink

SPECS = [(4, 6, [(28, 56)]), (2, 3, [(56, 56), (28, 28)]), (3, 5, [])]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def data(model):
    return next_batch(model, SPECS, seed=1)


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
