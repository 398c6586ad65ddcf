"""A checkpoint saved with save_pretrained and loaded offline from a local path is wrapped like any other;
bf16 weights work for every method."""

import pytest
import torch
from tiny import batch, prompt, tiny_llava
from transformers import LlavaForConditionalGeneration

import mmsink


def test_from_pretrained_local_path(tmp_path):
    tiny_llava().save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True).eval()
    inputs = batch([prompt(4, 6, seed=1), prompt(2, 3, seed=2)])
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        mmsink.wrap(model, prune="fastv", budget=1.0)
        same = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        mmsink.wrap(model, prune="fastv", budget=4)
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(same, ref)
    assert mmsink.stats(model).kept_tokens[-1] == [4, 4]


@pytest.mark.parametrize(
    "method", ["none", "fastv", "pdrop", "dart", "random", "pool", "visionzip", "visipruner"]
)
def test_bf16(method):
    """bf16 against fp32 of the same weights, both wrapped the same way (every token kept, so visipruner's
    shallow-stage reweighting is the only change from the bare model)."""
    opts = {} if method == "none" else {"budget": 1.0}
    inputs = batch([prompt(4, 6, seed=1), prompt(2, 3, seed=2)])
    with torch.no_grad():
        ref_model = mmsink.wrap(tiny_llava(), prune=method, **opts)
        ref = ref_model(**inputs).logits[:, -1]
    model = tiny_llava().to(torch.bfloat16)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        mmsink.wrap(model, prune=method, **opts)
        out = model(**inputs).logits[:, -1].float()
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    # keeping every token: bf16 rounding only (pool at budget 1.0 averages 1x1 windows = identity)
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)
    assert cached.shape == uncached.shape
