"""OrthoRank's own form through ``wrap(model, orthorank={...})`` and what it composes with: the alias is the
same run as ``prune="orthorank", form="layers"``; prompts without images (a whole batch of them) follow
the plain reference of the paper's form, batched == per sample, cached == uncached; ViT sinks
(``sink_forward``) are updated by every selection layer (the reference with them forced); the stats tell
the updated tokens from the held keys (checked against the input ids); refused combinations."""

import pytest
import torch
from orthorank_paper import orthorank_layers
from test_orthorank import LLAVA_PROMPTS, built
from tiny import IMAGE_TOKEN, batch, prompt

import mmsink
from mmsink.api import get_handle

TEXT = [prompt(4, 9, seed=5, images=0), prompt(2, 5, seed=6, images=0)]


def run(model, inputs, **settings):
    """(logits, stats) of one no-grad forward under ``wrap(model, **settings)``; unwrapped after."""
    mmsink.wrap(model, **settings)
    try:
        with torch.no_grad():
            out = model(**inputs).logits
        return out, mmsink.stats(model)
    finally:
        mmsink.unwrap(model)


def test_alias_is_the_layers_form():
    model, inputs = built("llava")
    a, sa = run(model, inputs, orthorank={"budget": 0.4, "layer": 1, "sink": "max_norm"})
    b, sb = run(model, inputs, prune="orthorank", form="layers", budget=0.4, layer=1, sink="max_norm")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert sa.extra["orthorank"] == sb.extra["orthorank"]
    assert sa.extra["orthorank"]["form"] == "layers" and sa.prefill_flops == sb.prefill_flops
    _, sd = run(model, inputs, orthorank=True)  # the defaults: K = 2, half of each prompt
    assert sorted(sd.extra["orthorank"]["updated"]) == [2, 3] and sd.budget == 0.5


def test_text_only_batch_follows_the_reference():
    """A batch without any image is planned (the paper's method is a text LLM's), each prompt as alone."""
    model, _ = built("llava", seed=1)
    inputs = batch(TEXT)
    del inputs["pixel_values"]
    mask = inputs["attention_mask"]
    out, st = run(model, inputs, orthorank={"budget": 0.4, "layer": 1})
    log = {}
    with torch.no_grad(), orthorank_layers(model, range(1, 4), 0.4, mask, log=log):
        ref = model(**inputs).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)
    got = st.extra["orthorank"]["updated_indices"]
    for li in range(1, 4):
        for i in range(2):
            assert got[li][i] == log[li][0][i].nonzero().flatten().tolist()
            assert len(got[li][i]) < len(TEXT[i])
    assert st.prefill_flops < 0.9 * st.baseline_prefill_flops
    mmsink.wrap(model, orthorank={"budget": 0.4, "layer": 1})
    try:
        with torch.no_grad():
            for i, p in enumerate(TEXT):
                one = model(
                    input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long)
                )
                torch.testing.assert_close(one.logits[0, -1], out[i, -1], atol=1e-4, rtol=1e-4)
                alone = mmsink.stats(model).extra
                assert alone["sample_prefill_flops"][0] == st.extra["sample_prefill_flops"][i]
            a = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            b = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(a, b)


def test_vit_sinks_are_always_updated():
    """Every image's 3 highest-norm tokens are ViT sinks (a threshold every token passes): each selection
    layer updates them, on top of the budget's tokens, as the reference with them forced; without
    sink_forward some of them skip a layer."""
    model, inputs = built("llava", seed=2)
    sinks = {"threshold": 1e-6, "max_sinks": 3}
    settings = {"budget": 0.2, "layer": 1}
    out, st = run(model, inputs, orthorank=settings, sink_forward=sinks)
    force = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    for i, found in enumerate(st.extra["vit_sinks"]):
        assert len(found) == 3 * (LLAVA_PROMPTS[i].count(IMAGE_TOKEN) // 36)
        for s in found:
            force[i, s["position"]] = True
    log = {}
    mask = inputs["attention_mask"]
    with torch.no_grad(), orthorank_layers(model, range(1, 4), 0.2, mask, log=log, force=force):
        ref = model(**inputs).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)
    got = st.extra["orthorank"]["updated_indices"]
    for li in range(1, 4):
        for i in range(3):
            assert got[li][i] == log[li][0][i].nonzero().flatten().tolist()
            assert st.extra["orthorank"]["updated"][li][i] == len(got[li][i])
    _, plain = run(model, inputs, orthorank=settings)
    unforced = plain.extra["orthorank"]["updated_indices"]
    missed = [
        li
        for li in range(1, 4)
        for i in range(3)
        if not set(force[i].nonzero().flatten().tolist()) <= set(unforced[li][i])
    ]
    assert missed  # the test can tell


def test_stats_tell_updated_from_held():
    model, inputs = built("llava")
    _, st = run(model, inputs, orthorank={"budget": 0.3, "layer": 2})
    info = st.extra["orthorank"]
    ids, real = inputs["input_ids"], inputs["attention_mask"].sum(1).tolist()
    visual = (ids == IMAGE_TOKEN).sum(1).tolist()
    for li in (2, 3):
        assert info["held"][li] == real  # every token's keys and values stay
        assert st.kept_tokens[li] == visual  # the visual tokens it holds: all of them
        assert info["updated"][li] == [len(x) for x in info["updated_indices"][li]]
        assert all(u < r for u, r in zip(info["updated"][li], real))
        assert info["updated_visual"][li] == [
            int((ids[i, x] == IMAGE_TOKEN).sum()) for i, x in enumerate(info["updated_indices"][li])
        ]
        assert st.tokens_per_layer[li] == max(info["updated"][li])  # padded slots it ran: the updated ones
    assert 0 < sum(info["updated_visual"][2]) < sum(visual)


@pytest.mark.parametrize(
    "settings",
    [
        {"orthorank": {}, "prune": "fastv"},
        {"orthorank": {"budget": 0.5}, "budget": 0.5},
        {"orthorank": {}, "layer": 2},
        {"orthorank": {"form": "visual"}},
        {"orthorank": "yes"},
        {"orthorank": {"budget": 0.5}, "var": {"sink_dims": [0, 1]}},
        {"prune": "orthorank", "form": "layers", "var": {"sink_dims": [0, 1]}},
    ],
)
def test_refused(settings):
    model, _ = built("llava")
    with pytest.raises(ValueError, match="orthorank") as err:
        mmsink.wrap(model, **settings)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError):
        get_handle(model)  # nothing was left attached


def test_visual_form_keeps_var():
    model, inputs = built("llava")
    _, st = run(model, inputs, prune="orthorank", budget=0.5, var={"sink_dims": [0, 1]})
    assert st.extra["orthorank"]["form"] == "visual" and "var_sinks" in st.extra
