"""stats.prefill_flops agrees with torch.utils.flop_counter on the same forward (eager attention, so
that the counter sees the attention matmuls), pruned and unpruned: pruning really removes work."""

import pytest
import torch
from tiny import batch, llava_single, prompt, tiny_llava
from torch.utils.flop_counter import FlopCounterMode

import mmsink

CASES = [
    (None, {}),
    ("none", {}),
    ("fastv", {"budget": 6}),
    ("pdrop", {"budget": 0.3}),
    ("dart", {"budget": 8}),
    ("random", {"budget": 9}),
    ("pool", {"budget": 4}),
    ("visionzip", {"budget": 8}),
    ("visipruner", {"budget": 5}),
    ("visipruner", {"budget": 5, "layer_threshold": 0.9999}),  # fuses before the fallback
    # the same with masked layers up to the fallback (they run at full width: counted as run)
    ("visipruner", {"budget": 5, "layer_threshold": 0.9999, "mask_until_fallback": True}),
    ("visipruner", {"layer_threshold": 0.9999, "tokens_threshold": 0.05, "deep_threshold": 0.99999}),
]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=8, attn="eager")


@pytest.mark.parametrize("method,opts", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("logits_to_keep", [0, 1])
def test_prefill_flops_match_flop_counter(model, method, opts, logits_to_keep):
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2, images=2)], seed=3)
    mmsink.wrap(model, prune=method, **opts)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(**inputs, logits_to_keep=logits_to_keep)
        st = mmsink.stats(model)
    finally:
        mmsink.unwrap(model)
    counted = fc.get_total_flops()
    assert abs(st.prefill_flops - counted) <= 0.02 * counted, (st.prefill_flops, counted)
    with torch.no_grad(), FlopCounterMode(display=False) as fc0:
        model(**inputs, logits_to_keep=logits_to_keep)
    base = fc0.get_total_flops()
    assert abs(st.baseline_prefill_flops - base) <= 0.02 * base
    # fusing at layer 3 of 8, masked at the full width until the fallback (4): no saving on this toy depth
    if method not in (None, "none") and not opts.get("mask_until_fallback"):
        assert st.prefill_flops < 0.95 * st.baseline_prefill_flops


@pytest.mark.parametrize("method,opts", [(None, {}), ("fastv", {"budget": 6}), ("pool", {"budget": 4})])
def test_sample_flops_match_single_runs(model, method, opts):
    """extra['sample_prefill_flops'] of a padded batch = what each sample executes alone."""
    prompts = [prompt(5, 7, seed=1), prompt(2, 4, seed=2, images=2)]
    inputs = batch(prompts, seed=3)
    mmsink.wrap(model, prune=method, **opts)
    try:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
            per = mmsink.stats(model).extra["sample_prefill_flops"]
            for i in range(len(prompts)):
                one = llava_single(inputs, prompts, i)
                with FlopCounterMode(display=False) as fc:
                    model(**one, logits_to_keep=1)
                assert abs(per[i] - fc.get_total_flops()) <= 0.02 * fc.get_total_flops()
    finally:
        mmsink.unwrap(model)
