"""Active / dormant heads (mmsink inspect): a head made dormant by construction in the test is found dormant,
an ordinary head stays active, and the numbers agree with the model's own eager attention and o_proj."""

import json

import pytest
import torch
from mmsink.evals.reference_model import build_config, build_processor, build_tokenizer
from PIL import Image
from tiny import tiny_llava
from transformers import LlavaForConditionalGeneration

from mmsink.tools.diagnose import collect
from mmsink.tools.heads import DRAIN, MASS, classify, head_report, value_out_norms
from mmsink.tools.inspector import inspect_model
from mmsink.tools.loading import encode

SINK_DIM, CONST_DIM, LAYER, DORMANT, ACTIVE = 3, 5, 1, 0, 1


def make_dormant(model, layer, head, plant_sink=lambda h: True):
    """Fixture surgery on one layer: token 0 gets a massive channel SINK_DIM and every token a constant
    channel CONST_DIM (a pre-hook on the layer, as real models' residual sinks); ``head``'s query reads the
    constant channel and its key the sink channel in the lowest-frequency rotary pair (RoPE barely turns
    it), so every row attends to token 0; its value ignores both channels, so token 0's normalised state,
    nearly all SINK_DIM, gives a near-zero value. The other heads are made blind to both channels, so they
    stay what their random weights make them. ``plant_sink(hidden)`` decides per forward whether token 0
    gets its massive channel."""
    blk = model.model.language_model.layers[layer]
    attn = blk.self_attn
    hd = attn.head_dim
    kv = head // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
    c = hd // 2 - 1  # rotate_half pairs (c, c + hd/2); inv_freq[c] is the smallest

    def plant(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, :, CONST_DIM] += 30.0
        if plant_sink(h):
            h[:, 0, SINK_DIM] += 500.0
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight[:, [SINK_DIM, CONST_DIM]] = 0.0
        attn.q_proj.weight[head * hd : (head + 1) * hd] = 0.0
        attn.k_proj.weight[kv * hd : (kv + 1) * hd] = 0.0
        attn.q_proj.weight[head * hd + c, CONST_DIM] = 2.0
        attn.k_proj.weight[kv * hd + c, SINK_DIM] = 2.0
    return blk.register_forward_pre_hook(plant, with_kwargs=True)


@pytest.fixture(scope="module")
def ref():
    tok = build_tokenizer(["What color is the square?", "How many circles are there?"] * 20, vocab_size=300)
    proc = build_processor(tok, image_size=56)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build_config(tok, image_size=56, size="test")).eval()
    model.set_attn_implementation("eager")
    img = Image.fromarray((torch.rand(56, 56, 3) * 255).byte().numpy())
    return model, proc, img


def eager_reference(model, inputs, layer):
    """Sink mass per head from the model's own eager attention weights (rows 1..n-1, column 0)."""
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[layer][0]
    return att[:, 1:, 0].mean(-1)


def test_constructed_head_is_dormant_other_active(ref):
    from mmsink.patches import family_for

    model, proc, img = ref
    hook = make_dormant(model, LAYER, DORMANT)
    try:
        inputs = encode(proc, img, "What color is the square?", "cpu")
        family = family_for(model)
        data = collect(model, inputs, family)
        rows = head_report(data, family.layers)
        torch.testing.assert_close(
            torch.tensor(rows[LAYER]["sink_mass"]), eager_reference(model, inputs, LAYER), atol=1e-4, rtol=0
        )
    finally:
        hook.remove()
    r = rows[LAYER]
    assert r["sink_mass"][DORMANT] > 0.99 and r["value_ratio"][DORMANT] < 0.1
    assert r["dormant"][DORMANT] and r["dormant_heads"] == [DORMANT]
    assert r["sink_mass"][ACTIVE] < MASS and not r["dormant"][ACTIVE]
    # the planted residual peak: ~sqrt(500^2 + 30^2) against ~30 for the others (their own states are small)
    assert r["max_norm_token"] == 0
    assert r["peak_ratio"] == pytest.approx((500**2 + 30**2) ** 0.5 / 30, rel=0.1)
    assert rows[0]["peak_ratio"] < 5  # nothing planted before the layer


def test_thresholds_each_needed():
    """Parked but with a large sink value: 'sink_only', not dormant; drained but not parked: active."""
    n = 6
    probs = torch.zeros(3, n, n)
    probs[0, :, 0] = 1.0  # parked on the sink
    probs[1, :, 0] = 1.0
    probs[2] = torch.full((n, n), 1.0).tril() / torch.arange(1, n + 1)[:, None]  # uniform causal
    vo = torch.ones(3, n)
    vo[0, 0] = DRAIN / 2  # drained
    vo[2, 0] = DRAIN / 2
    got = classify(probs, vo)
    assert got["dormant"] == [True, False, False]
    assert got["sink_only"] == [False, True, False]
    assert got["value_ratio"][0] == pytest.approx(DRAIN / 2)


def test_value_out_norms_match_o_proj_per_head():
    """||v_j W_O^h|| against o_proj applied to head h's slice of the values alone (grouped-query model)."""
    model = tiny_llava(layers=2, kv_heads=2)
    blk = model.model.language_model.layers[1]
    attn = blk.self_attn
    h = torch.randn(10, 64)
    got = value_out_norms(blk, h)
    heads, hd = attn.config.num_attention_heads, attn.head_dim
    with torch.no_grad():
        v = attn.v_proj(blk.input_layernorm(h)).view(10, -1, hd)
        for i in range(heads):
            only = torch.zeros(10, heads, hd)
            only[:, i] = v[:, i // (heads // v.shape[1])]
            ref = attn.o_proj(only.view(10, -1)).norm(dim=-1)
            torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-4)


def test_inspect_json_and_png_with_text_only_comparison(ref, tmp_path):
    """The head is dormant on the text-only question (the massive channel is planted only then) and
    active with the image: 'woken_by_image'. The JSON has the fields; the PNG is written."""
    from mmsink.tools.heads import plot_heads, text_only_inputs

    model, proc, img = ref
    n_img = encode(proc, img, "What color is the square?", "cpu")["input_ids"].shape[1]
    n_text = text_only_inputs(proc, "What color is the square?", "cpu")["input_ids"]
    assert n_text.shape[1] < n_img and not (n_text == model.config.image_token_id).any()
    hook = make_dormant(model, LAYER, DORMANT, plant_sink=lambda h: h.shape[1] < n_img)
    try:
        rep = inspect_model(model, proc, img, "What color is the square?", tau=4.0)
    finally:
        hook.remove()
    heads = json.loads(json.dumps(rep["heads"]))
    assert heads["thresholds"] == {"sink_mass": MASS, "value_ratio": DRAIN}
    n_layers = len(model.model.language_model.layers)
    for run in ("image", "text"):
        assert len(heads[run]) == n_layers
        for r in heads[run]:
            assert len(r["sink_mass"]) == len(r["value_ratio"]) == len(r["dormant"]) == 2
            assert {"peak_ratio", "sink_norm", "median_norm", "max_norm_token", "dormant_heads"} <= set(r)
    assert heads["text"][LAYER]["dormant_heads"] == [DORMANT]
    assert heads["image"][LAYER]["dormant_heads"] == []
    cmp = heads["compare"]["layers"][LAYER]
    assert cmp["woken_by_image"] == [DORMANT] and cmp["dormant_with_image"] == []
    assert heads["compare"]["dormant_fraction_text"] > heads["compare"]["dormant_fraction_image"]
    assert heads["image"][LAYER]["sink_mass"][DORMANT] < 0.5
    plot_heads(heads, tmp_path / "heads.png")
    assert (tmp_path / "heads.png").stat().st_size > 1000
