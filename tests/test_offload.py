"""A model dispatched by accelerate through ``device_map`` (here layers offloaded to disk: accelerate's
hooks move weights in per call and the layers' parameters sit on the meta device) runs every plan as the
plain model does: same greedy tokens, same kept tokens. The cross-GPU version is tests/test_multigpu.py."""

import pytest
import torch
from test_var import VAR
from tiny import batch, generate_each, prompt, split_map, tiny_llava
from transformers import LlavaForConditionalGeneration


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    plain = tiny_llava()
    plain.save_pretrained(path)
    offloaded = LlavaForConditionalGeneration.from_pretrained(
        path,
        device_map=split_map(8, 3, "cpu", "disk", last="cpu"),
        offload_folder=str(tmp_path_factory.mktemp("offload")),
    ).eval()
    offloaded.set_attn_implementation("sdpa")
    layer = offloaded.model.language_model.layers[5]
    assert hasattr(layer, "_hf_hook") and next(layer.parameters()).device.type == "meta"
    return plain, offloaded


@pytest.mark.parametrize(
    "method,opts",
    [
        ("fastv", {"budget": 6}),
        ("pdrop", {}),
        ("visipruner", {}),
        ("dart", {"budget": 8}),
        ("fastv", {"var": VAR}),
    ],
)
def test_offloaded_model_runs_the_same_plan(pair, method, opts):
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    (a, sa), (b, sb) = generate_each(pair, inputs, method, opts, max_new_tokens=6)
    assert torch.equal(a, b) and sa.kept_indices == sb.kept_indices


def test_generate_fast_refuses_offloaded_weights(pair):
    """generate_fast calls the layers' modules itself, so weights that accelerate keeps on disk cannot
    work: a clear refusal, not a meta-tensor error from inside the decode step."""
    import mmsink

    inputs = batch([prompt(5, 7, seed=1)])
    with pytest.raises(ValueError, match="offloads layers"):
        mmsink.generate_fast(pair[1], max_new_tokens=3, **inputs)
