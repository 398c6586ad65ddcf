"""Random settings and random inputs at ``wrap`` + ``generate`` on tiny models of every family: batch
size, padding (prompt lengths), image sizes, one / two / no images per sample, method, budget. Either
mmsink refuses with a clean ValueError, or each sample's greedy tokens equal its own run alone."""

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tiny import (
    batch,
    next_batch,
    next_single,
    pixels_of,
    prompt,
    qwen_batch,
    qwen_single,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen,
)

import mmsink

MODELS = {}


def model_of(family):
    if family not in MODELS:
        build = {"llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2_vl": tiny_qwen}[family]
        MODELS[family] = build(layers=4)
    return MODELS[family]


def make(family, samples, seed):
    """(batched inputs, per-sample inputs) for ``samples``: (n_sys, n_text, image sizes) each."""
    if family == "llava" or (family == "llava_next" and not any(imgs for _, _, imgs in samples)):
        prompts = [
            prompt(n_sys, n_text, images=len(imgs), seed=seed + i)
            for i, (n_sys, n_text, imgs) in enumerate(samples)
        ]
        inputs = batch(prompts, seed=seed)
        if inputs["pixel_values"].shape[0] == 0:
            inputs.pop("pixel_values")

        def single(i):
            one = batch([prompts[i]])
            pix = pixels_of(inputs, prompts, i) if "pixel_values" in inputs else None
            one.pop("pixel_values")
            if pix is not None and pix.shape[0]:
                one["pixel_values"] = pix
            return one

        return inputs, single
    if family == "llava_next":
        sizes = {1: (28, 28), 2: (28, 56), 3: (56, 28), 4: (56, 56)}
        specs = [(n_sys, n_text, [sizes[s] for s in imgs]) for n_sys, n_text, imgs in samples]
        inputs, _ = next_batch(model_of(family), specs, seed=seed)
    else:
        grids = {1: (2, 2), 2: (2, 4), 3: (4, 2), 4: (4, 4)}
        specs = [(n_sys, n_text, [grids[s] for s in imgs]) for n_sys, n_text, imgs in samples]
        inputs, _ = qwen_batch(specs, seed=seed)
    single = next_single if family == "llava_next" else qwen_single

    def drop(x):  # no image in the batch: no pixel arguments at all
        return {k: v for k, v in x.items() if v is not None and (k == "input_ids" or v.numel())}

    return drop(inputs), lambda i: drop(single(inputs, specs, i))


METHODS = [
    m for m in mmsink.methods() if m not in ("replay", "cdpruner")
]  # replay needs a plan; cdpruner a CLIP
sample = st.tuples(st.integers(1, 4), st.integers(1, 6), st.lists(st.integers(1, 4), max_size=2))
budget = st.one_of(st.none(), st.integers(-2, 40), st.floats(-0.5, 1.5, allow_nan=False))


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    method=st.sampled_from(METHODS),
    budget=budget,
    samples=st.lists(sample, min_size=1, max_size=3),
    sink_forward=st.booleans(),
    seed=st.integers(0, 100),
)
def test_wrap_generate_is_refused_cleanly_or_equals_each_sample_alone(
    family, method, budget, samples, sink_forward, seed
):
    model = model_of(family)
    inputs, single = make(family, samples, seed)
    try:
        mmsink.wrap(model, prune=method, budget=budget, sink_forward=sink_forward)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    except ValueError as e:
        assert str(e).strip() and "\n" not in str(e).strip()  # one clean line
        event("refused")
        unwrap(model)
        return
    event(f"compared ({family})")
    try:
        new = out[:, inputs["input_ids"].shape[1] :]
        for i in range(len(samples)):
            one = single(i)
            with torch.no_grad():
                alone = model.generate(**one, max_new_tokens=3, do_sample=False)
            assert alone[0, one["input_ids"].shape[1] :].tolist() == new[i].tolist(), (i, samples)
    finally:
        unwrap(model)


def unwrap(model):
    if getattr(model, "_mmsink", None) is not None:  # a refused wrap leaves the model as it was
        mmsink.unwrap(model)
