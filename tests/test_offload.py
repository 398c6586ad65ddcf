"""A model dispatched by accelerate through ``device_map`` (here layers offloaded to disk: accelerate's
hooks move weights in per call and the layers' parameters sit on the meta device) runs every plan as the
plain model does: same greedy tokens, same kept tokens. The cross-GPU version is tests/test_multigpu.py."""

import pytest
import torch
from test_var import VAR
from tiny import batch, prompt, tiny_llava
from transformers import LlavaForConditionalGeneration

import mmsink


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    plain = tiny_llava()
    plain.save_pretrained(path)
    dm = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "lm_head": "cpu"}
    dm.update({f"model.language_model.{n}": "cpu" for n in ("embed_tokens", "rotary_emb", "norm")})
    dm.update({f"model.language_model.layers.{i}": "cpu" if i < 3 else "disk" for i in range(8)})
    offloaded = LlavaForConditionalGeneration.from_pretrained(
        path, device_map=dm, offload_folder=str(tmp_path_factory.mktemp("offload"))
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
    out = []
    for model in pair:
        mmsink.wrap(model, prune=method, **opts)
        try:
            with torch.no_grad():
                tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            out.append((tokens, mmsink.stats(model).kept_indices))
        finally:
            mmsink.unwrap(model)
    assert torch.equal(out[0][0], out[1][0]) and out[0][1] == out[1][1]
