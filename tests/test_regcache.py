"""RegCache (cached register keys / values prefixed to the vision tower's blocks) and the tower's fake
quantization, against plain references written here: a CLIP tower forward with the prefix concatenated by
hand, and a quantizer built on torch's own fake-quantize ops."""

from __future__ import annotations

import pytest
import tiny
import torch
import torch.nn.functional as F

import mmsink
from mmsink.sinks import regcache


def llava64(seed=0):
    return tiny.tiny_llava(layers=2, seed=seed).double()


def inputs_of(n=3, seed=0):
    prompts = [tiny.prompt(3, 4, images=1, seed=seed + s) for s in range(n)]
    out = tiny.batch(prompts, seed=seed)
    out["pixel_values"] = out["pixel_values"].double()
    return out, prompts


def tower_layers(m):
    return m.model.vision_tower.encoder.layers


# ------------------------------------------------------------------------ plain references


def ref_weight(w, bits):
    q = 2 ** (bits - 1) - 1
    scale = w.abs().amax(1) / q
    return torch.fake_quantize_per_channel_affine(
        w.float(), scale.float(), torch.zeros(len(w), dtype=torch.int32), 0, -q, q
    ).to(w.dtype)


def ref_act(x, bits, act):
    """Per image (row of the batch) or per token; torch's per-tensor fake quantizer, one call per unit."""
    q = 2 ** (bits - 1) - 1
    units = x.reshape(-1, x.shape[-1]) if act == "per_token" else x.reshape(x.shape[0], -1)
    rows = [
        torch.fake_quantize_per_tensor_affine(u.float(), max(u.abs().max().item(), 1e-12) / q, 0, -q, q)
        for u in units
    ]
    return torch.stack(rows).reshape(x.shape).to(x.dtype)


def ref_linear(lin, x, quant):
    if quant is None:
        return F.linear(x, lin.weight, lin.bias)
    w_bits, a_bits, act = quant
    return F.linear(ref_act(x, a_bits, act), ref_weight(lin.weight, w_bits), lin.bias)


def ref_tower(m, pv, rc=None, quant=None):
    """The CLIP tower's hidden states, written out: attention with the registers concatenated in front of
    each prefixed block's keys and values."""
    vm = m.model.vision_tower
    h = vm.pre_layrnorm(vm.embeddings(pv))
    states = [h]
    for i, layer in enumerate(vm.encoder.layers):
        a = layer.self_attn
        b, n, d = h.shape
        x = layer.layer_norm1(h)
        q, k, v = (
            ref_linear(p, x, quant).view(b, n, a.num_heads, -1).transpose(1, 2)
            for p in (a.q_proj, a.k_proj, a.v_proj)
        )
        if rc is not None and i in rc.keys:
            pk = rc.keys[i].to(k)[None, :, None].expand(b, -1, rc.tau, -1)
            pv_ = rc.values[i].to(v)[None, :, None].expand(b, -1, rc.tau, -1)
            k, v = torch.cat([pk, k], 2), torch.cat([pv_, v], 2)
        w = torch.softmax(q @ k.transpose(-1, -2) * a.scale, -1)
        h = h + ref_linear(a.out_proj, (w @ v).transpose(1, 2).reshape(b, n, d), quant)
        x = layer.mlp.activation_fn(ref_linear(layer.mlp.fc1, layer.layer_norm2(h), quant))
        h = h + ref_linear(layer.mlp.fc2, x, quant)
        states.append(h)
    return states


def tower_states(m, pv):
    return m.model.vision_tower(pv, output_hidden_states=True).hidden_states


@pytest.fixture(scope="module")
def setup():
    m = llava64()
    inputs, prompts = inputs_of()
    rc = regcache.curate(
        m, [{"pixel_values": inputs["pixel_values"]}], start=0, sensitive=0, tau=3, candidates=5
    )
    return m, inputs, prompts, rc


# ------------------------------------------------------------------------ tests


def test_cached_states_equal_recomputed(setup):
    m, inputs, _, rc = setup
    with torch.no_grad():
        hs = tower_states(m, inputs["pixel_values"])  # hs[i]: block i's input
        rows = [h.reshape(-1, h.shape[-1]) for h in hs]
        top = rows[0].abs().amax(-1).topk(5).indices
        for i, layer in enumerate(tower_layers(m)):
            x = layer.layer_norm1(rows[i][top])
            k = layer.self_attn.k_proj(x).view(5, 4, -1).mean(0)
            v = layer.self_attn.v_proj(x).view(5, 4, -1).mean(0)
            torch.testing.assert_close(rc.keys[i], k.float(), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(rc.values[i], v.float(), atol=1e-6, rtol=1e-6)
    assert rc.report["candidate_linf"] == pytest.approx(rows[0][top].abs().amax(-1).mean().item(), rel=1e-6)


def test_quant_off_equals_prefixed_tower(setup):
    m, inputs, _, rc = setup
    pv = inputs["pixel_values"]
    with torch.no_grad():
        plain = tower_states(m, pv)[-2]
        ref = ref_tower(m, pv, rc)[-2]
        mmsink.wrap(m, regcache=rc)
        try:
            got = tower_states(m, pv)[-2]
            logits = m(**inputs).logits
        finally:
            mmsink.unwrap(m)
        # the whole model with the reference tower's features fed to the projector
        feed = m.model.multi_modal_projector.register_forward_pre_hook(lambda mod, a: (ref[:, 1:],))
        try:
            want = m(**inputs).logits
        finally:
            feed.remove()
    assert (plain - ref).abs().max() > 1e-3  # the prefix changes the tower
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logits, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("bits,act", [("w8a8", "per_tensor"), ("w4a4", "per_tensor"), ("w6a6", "per_token")])
def test_fake_quant_matches_reference_quantizer(setup, bits, act):
    """Bound: 2e-6 of the states' scale (torch's fake-quantize ops round in float32, the model is float64;
    no value lands on a different level, which would cost a whole step, >= 1e-2 here)."""
    m, inputs, _, rc = setup
    pv = inputs["pixel_values"]
    wa = {"w8a8": (8, 8), "w4a4": (4, 4), "w6a6": (6, 6)}[bits]
    with torch.no_grad():
        ref = ref_tower(m, pv, rc, (*wa, act))[-2]
        exact = ref_tower(m, pv, rc)[-2]
        mmsink.wrap(m, regcache=rc, quant_vision={"bits": bits, "act": act})
        try:
            got = tower_states(m, pv)[-2]
        finally:
            mmsink.unwrap(m)
    assert (ref - exact).abs().max() > 1e-4  # quantization is on
    assert (got - ref).abs().max() <= 2e-6 * ref.abs().max()


def test_batched_equals_per_sample_with_visionzip(setup):
    m, inputs, prompts, rc = setup

    def single(inp, i):
        keep = inp["attention_mask"][i].bool()
        ids = inp["input_ids"][i][keep][None]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": tiny.pixels_of(inp, prompts, i),
        }

    st, a, b = tiny.batched_and_cached(
        m,
        inputs,
        single,
        3,
        3,
        prune="visionzip",
        budget=8,
        regcache=rc,
        quant_vision="w8a8",
    )
    assert torch.equal(a, b)
    with torch.no_grad():
        mmsink.wrap(m, regcache=rc, quant_vision="w4a4")
        try:
            batch = tower_states(m, inputs["pixel_values"])[-2]
            for i in range(3):
                one = tower_states(m, inputs["pixel_values"][i : i + 1])[-2]
                torch.testing.assert_close(batch[i : i + 1], one, atol=1e-10, rtol=1e-10)
        finally:
            mmsink.unwrap(m)


def test_visionzip_reads_image_tokens_only(setup):
    """VisionZip's [CLS] scores come from the feature layer's q / k projections: under RegCache they hold
    the image's 37 tokens (36 patches + [CLS]) and no register, and equal the prefixed reference tower's."""
    m, inputs, _, rc = setup
    seen = []
    layer = tower_layers(m)[0]
    tap = layer.self_attn.k_proj.register_forward_hook(lambda mod, a, out: seen.append(out))
    with torch.no_grad():
        mmsink.wrap(m, prune="visionzip", budget=8, regcache=rc)
        try:
            m(**inputs)
        finally:
            mmsink.unwrap(m)
            tap.remove()
        want = layer.self_attn.k_proj(layer.layer_norm1(ref_tower(m, inputs["pixel_values"], rc)[0]))
    assert seen[0].shape[1] == 37
    torch.testing.assert_close(seen[0], want, atol=1e-10, rtol=1e-10)


def test_unwrap_restores_exactly(setup):
    m, inputs, _, rc = setup
    attn_impl = m.config.vision_config._attn_implementation
    with torch.no_grad():
        before = m(**inputs).logits
        mmsink.wrap(m, prune="fastv", budget=8, k=1, regcache=rc, quant_vision="w4a4")
        with mmsink.disabled(m):
            off = m(**inputs).logits
        mmsink.unwrap(m)
        after = m(**inputs).logits
    assert torch.equal(before, after) and torch.equal(before, off)
    assert m.config.vision_config._attn_implementation == attn_impl
    assert all("forward" not in mod.__dict__ for mod in m.modules())


def test_qwen_batched_equals_per_sample():
    m = tiny.tiny_qwen(layers=2).double()
    specs = [(2, 3, [(4, 4)]), (1, 2, [(4, 6)])]
    inputs, _ = tiny.qwen_batch(specs)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    batch = [{"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}]
    rc = regcache.curate(m, batch, tau=2, candidates=4)
    vis = m.model.visual
    with torch.no_grad():
        plain = vis(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state
        mmsink.wrap(m, prune="visionzip", budget=2, regcache=rc, quant_vision="w8a8")
        try:
            both = vis(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state
            first = vis(inputs["pixel_values"][:16], grid_thw=inputs["image_grid_thw"][:1]).last_hidden_state
            second = vis(inputs["pixel_values"][16:], grid_thw=inputs["image_grid_thw"][1:]).last_hidden_state
            m(**inputs)
        finally:
            mmsink.unwrap(m)
        again = vis(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state
    assert (both - plain).abs().max() > 1e-4
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-10, rtol=1e-10)
    assert torch.equal(plain, again)


def test_bad_settings_are_refused(setup):
    m, _, _, rc = setup
    with pytest.raises(ValueError, match="quant_vision must be one of"):
        mmsink.wrap(m, quant_vision="w3a3")
    with pytest.raises(ValueError, match="regcache must be a RegCache"):
        mmsink.wrap(m, regcache={"tau": 2})
    with pytest.raises(ValueError, match="unwrapped model"):
        mmsink.wrap(m, prune="visionzip", budget=8)
        try:
            regcache.curate(m, [{"pixel_values": torch.zeros(1, 3, 84, 84)}])
        finally:
            mmsink.unwrap(m)
