"""The core contract on every family beyond LLaVA-1.5 (LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL), one test per
check and every method: keeping everything changes nothing; batched == per-sample (left padding, images
of different sizes, a text-only sample) and cached == uncached greedy decoding; stats' FLOPs agree with
``FlopCounterMode``. Family-specific checks live in test_llava_next.py and test_qwen.py."""

from functools import cache

import pytest
import torch
from tiny import (
    batched_and_cached,
    counted_prefill,
    next_batch,
    next_single,
    qwen_batch,
    qwen_single,
    tiny_llava_next,
    tiny_qwen,
)

import mmsink

NEXT_SPECS = [(4, 6, [(28, 56)]), (2, 3, [(56, 56), (28, 28)]), (3, 5, [])]  # image sizes in pixels
QWEN_SPECS = [(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)]), (3, 5, [])]  # patch grids
COMMON = [
    ("fastv", {"budget": 6}),
    ("pdrop", {}),
    ("dart", {"budget": 5, "image_pivots": 2, "text_pivots": 2}),
    ("random", {"budget": 0.5}),
    ("visipruner", {"budget": 4}),
]
FAMILIES = {
    "llava_next": dict(
        build=lambda attn: tiny_llava_next(attn=attn),
        batch=lambda m: next_batch(m, NEXT_SPECS, seed=1)[0],
        single=lambda inputs, i: next_single(inputs, NEXT_SPECS, i),
        samples=len(NEXT_SPECS),
        methods=COMMON
        + [
            ("fastv", {"budget": 0.3, "k": 3}),
            ("visionzip", {"budget": 0.5}),
            ("pool", {"budget": 0.25}),
            ("fastv", {"budget": 4, "sink_forward": {"factor": 1.01, "max_sinks": 2}}),
        ],
        flops=[
            (None, {}),
            ("fastv", {"budget": 6}),
            ("pool", {"budget": 0.25}),
            ("visipruner", {"budget": 4}),
            ("visionzip", {"budget": 0.5}),
        ],
    ),
    **{
        kind: dict(
            build=lambda attn, kind=kind: tiny_qwen(kind, attn=attn),
            batch=lambda m: qwen_batch(QWEN_SPECS, seed=1)[0],
            single=lambda inputs, i: qwen_single(inputs, QWEN_SPECS, i),
            samples=len(QWEN_SPECS),
            methods=COMMON + [("pool", {"budget": 4}), ("visionzip", {"budget": 0.5})],
            flops=[
                (None, {}),
                ("fastv", {"budget": 6}),
                ("pool", {"budget": 4}),
                ("visionzip", {"budget": 0.5}),
            ],
        )
        for kind in ("qwen2_vl", "qwen2_5_vl")
    },
}


@cache
def built(family: str, attn: str = "sdpa"):
    model = FAMILIES[family]["build"](attn)
    return model, FAMILIES[family]["batch"](model)


def cases(key):
    return [
        pytest.param(f, m, o, id=f"{f}-{m}-{i}")
        for f in FAMILIES
        for i, (m, o) in enumerate(FAMILIES[f][key])
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_everything_matches_baseline(family):
    model, inputs = built(family)
    with torch.no_grad():
        ref = model(**inputs).logits
        mmsink.wrap(model, prune="fastv", budget=1.0)
        try:
            out = model(**inputs).logits
        finally:
            mmsink.unwrap(model)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,method,opts", cases("methods"))
def test_batched_per_sample_and_cached(family, method, opts):
    model, inputs = built(family)
    fam = FAMILIES[family]
    st, a, b = batched_and_cached(model, inputs, fam["single"], fam["samples"], 5, prune=method, **opts)
    assert torch.equal(a, b)
    assert min(st.kept_tokens[-1][:2]) < max(st.visual_tokens)  # it did prune


@pytest.mark.parametrize("family,method,opts", cases("flops"))
def test_flops_match_counter(family, method, opts):
    model, inputs = built(family, "eager")
    st, counted = counted_prefill(model, inputs, prune=method, **opts)
    assert abs(st.prefill_flops - counted) <= 0.02 * counted, (st.prefill_flops, counted)
