"""RegCache (cached register keys / values prefixed to the vision tower's blocks) and the tower's fake
quantization, against plain references written here: a CLIP tower forward with the prefix concatenated by
hand, and a quantizer built on torch's own fake-quantize ops."""

from __future__ import annotations

import dataclasses

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


def ref_block(layer, h, i, rc=None, quant=None):
    """One CLIP block written out: attention with the registers concatenated in front of the keys and
    values of a prefixed block; ``h`` [B, N, D], each row of the batch one image (its quantizer scale)."""
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
    return h + ref_linear(layer.mlp.fc2, x, quant)


def ref_tower(m, pv, rc=None, quant=None):
    """The CLIP tower's hidden states, block by block (``ref_block``). With ``rc.delete`` = k, image by
    image: at block ``rc.sensitive`` the k patches of largest norm (a sort, [CLS] excluded) leave; later
    blocks run on the others, and every block's output at a deleted patch is the mean of the kept patches
    among its 8 grid neighbours (a plain loop)."""
    vm = m.model.vision_tower
    h = vm.pre_layrnorm(vm.embeddings(pv))
    states, kept = [h], None
    for i, layer in enumerate(vm.encoder.layers):
        if rc is not None and rc.delete and i == rc.sensitive:
            kept = [ref_kept(row, rc.delete) for row in h]
        if kept is None:
            h = ref_block(layer, h, i, rc, quant)
        else:
            h = torch.stack(
                [
                    ref_fill(row, ref_block(layer, row[ks][None], i, rc, quant)[0], ks)
                    for row, ks in zip(h, kept)
                ]
            )
        states.append(h)
    return states


def ref_kept(row, k):
    norms = [(row[j].norm().item(), j) for j in range(1, len(row))]
    gone = {j for _, j in sorted(norms, reverse=True)[:k]}
    return [j for j in range(len(row)) if j not in gone]


def ref_fill(row, out, kept):
    g = int((len(row) - 1) ** 0.5)
    full = torch.zeros_like(row)
    full[kept] = out
    for j in set(range(len(row))) - set(kept):
        r, c = divmod(j - 1, g)
        near = [
            1 + rr * g + cc
            for rr in range(r - 1, r + 2)
            for cc in range(c - 1, c + 2)
            if 0 <= rr < g and 0 <= cc < g and 1 + rr * g + cc in kept
        ]
        full[j] = full[near].mean(0)
    return full


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


# ------------------------------------------------------------------------ token deletion


@pytest.mark.parametrize("quant", [None, ("w4a4", (4, 4, "per_tensor"))])
def test_deletion_matches_reference(setup, quant):
    """Every tower state (deletion at block 0, the feature layer's too) and the logits equal the plain
    reference's: deleted patches out of the attention and the quantizer scales, neighbour-mean fill."""
    m, inputs, _, rc = setup
    pv = inputs["pixel_values"]
    rc_del = dataclasses.replace(rc, delete=3)
    with torch.no_grad():
        ref = ref_tower(m, pv, rc_del, quant and quant[1])
        kept_only = ref_tower(m, pv, rc, quant and quant[1])
        mmsink.wrap(m, regcache=rc_del, quant_vision=quant and quant[0])
        try:
            got = tower_states(m, pv)
            logits = m(**inputs).logits
        finally:
            mmsink.unwrap(m)
        feed = m.model.multi_modal_projector.register_forward_pre_hook(lambda mod, a: (ref[-2][:, 1:],))
        try:
            want = m(**inputs).logits
        finally:
            feed.remove()
    assert (ref[-2] - kept_only[-2]).abs().max() > 1e-3  # deletion changes the features
    tol = 2e-6 if quant else 1e-10
    for g, r in zip(got, ref, strict=True):
        assert (g - r).abs().max() <= tol * r.abs().max()
    assert (logits - want).abs().max() <= tol * 10 * want.abs().max()


def test_deletion_refusals(setup):
    m, _, _, rc = setup
    with pytest.raises(ValueError, match="vision-stage pruner"):
        mmsink.wrap(m, prune="visionzip", budget=8, regcache=dataclasses.replace(rc, delete=2))
    with pytest.raises(ValueError, match="delete must be an integer"):
        dataclasses.replace(rc, delete=-1)
    q = tiny.tiny_qwen(layers=2)
    qrc = regcache.RegCache({0: torch.zeros(4, 8)}, {0: torch.zeros(4, 8)}, 1, 0, 0, delete=1)
    with pytest.raises(ValueError, match="needs a CLIP tower"):
        mmsink.wrap(q, regcache=qrc)


# ------------------------------------------------------------------------ LLaVA-NeXT


def test_next_matches_reference_tower_and_batches():
    """LLaVA-NeXT: each tile is one image to the tower (its own quantizer scale and deleted patch); the
    logits equal the model fed the reference tower's features, and the batch equals each sample alone."""
    m = tiny.tiny_llava_next(layers=2).double()
    specs = [(2, 3, [(28, 56)]), (1, 2, [(56, 56)])]
    inputs, _ = tiny.next_batch(m, specs)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    seen = []
    tap = m.model.vision_tower.register_forward_pre_hook(
        lambda mod, a, kw: seen.append(a[0] if a else kw["pixel_values"]), with_kwargs=True
    )
    with torch.no_grad():
        m(**inputs)
    tap.remove()
    tiles = seen[0]
    rc = regcache.curate(m, [{"pixel_values": tiles}], start=0, sensitive=0, tau=2, candidates=4, delete=1)
    quant = {"bits": "w8a8", "act": "per_tensor"}
    with torch.no_grad():
        ref = ref_tower(m, tiles, rc, (8, 8, "per_tensor"))
        feed = m.model.multi_modal_projector.register_forward_pre_hook(lambda mod, a: (ref[-2][:, 1:],))
        try:
            want = m(**inputs).logits
        finally:
            feed.remove()
        mmsink.wrap(m, regcache=rc, quant_vision=quant)
        try:
            got = m(**inputs).logits
            for i in range(len(specs)):
                one = m(**tiny.next_single(inputs, specs, i)).logits[0]
                keep = inputs["attention_mask"][i].bool()
                # 1e-6: the unwrapped NeXT model's own batch and single runs differ by ~3e-8 here
                torch.testing.assert_close(got[i][keep], one, atol=1e-6, rtol=1e-6)
        finally:
            mmsink.unwrap(m)
        plain = m(**inputs).logits
    assert (plain - want).abs().max() > 1e-4
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()


# ------------------------------------------------------------------------ Qwen2-VL


def rotate(x, cos, sin):
    """Qwen2-VL's vision rotary, as the model applies it (in float32, cast back)."""
    xf = x.float()
    half = torch.cat([-xf[..., xf.shape[-1] // 2 :], xf[..., : xf.shape[-1] // 2]], -1)
    return (xf * cos.float()[:, None] + half * sin.float()[:, None]).to(x.dtype)


def ref_qwen_tower(m, pixel_values, grid, rc=None, quant=None):
    """Qwen2-VL's vision blocks written out image by image: rotary on the image's queries and keys, the
    registers (no rotary) in front of its keys and values, one quantizer scale per image."""
    vis = m.model.visual
    seen = {}
    tap = vis.blocks[0].register_forward_pre_hook(lambda mod, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        vis(pixel_values, grid_thw=grid)
    tap.remove()
    cos, sin = seen["position_embeddings"]
    cu = seen["cu_seqlens"].tolist()

    def lin(p, x):
        return ref_linear(p, x[None], quant)[0]

    h = vis.patch_embed(pixel_values)
    for i, blk in enumerate(vis.blocks):
        a, outs = blk.attn, []
        for s, e in zip(cu[:-1], cu[1:]):
            x = h[s:e]
            q, k, v = lin(a.qkv, blk.norm1(x)).view(e - s, 3, a.num_heads, -1).unbind(1)
            q, k = rotate(q, cos[s:e], sin[s:e]), rotate(k, cos[s:e], sin[s:e])
            if rc is not None and i in rc.keys:
                k = torch.cat([rc.keys[i].to(k)[None].expand(rc.tau, -1, -1), k])
                v = torch.cat([rc.values[i].to(v)[None].expand(rc.tau, -1, -1), v])
            w = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * a.scaling, -1)
            x = x + lin(a.proj, torch.einsum("hqk,khd->qhd", w, v).reshape(e - s, -1))
            outs.append(x + lin(blk.mlp.fc2, blk.mlp.act(lin(blk.mlp.fc1, blk.norm2(x)))))
        h = torch.cat(outs)
    return h


@pytest.mark.parametrize("quant", [None, ("w8a8", (8, 8, "per_tensor"))])
def test_qwen_matches_prefixed_reference(quant):
    m = tiny.tiny_qwen(layers=2).double()
    specs = [(2, 3, [(4, 4)]), (1, 2, [(4, 6), (4, 4)])]
    inputs, _ = tiny.qwen_batch(specs)
    pv, grid = inputs["pixel_values"].double(), inputs["image_grid_thw"]
    inputs["pixel_values"] = pv
    rc = regcache.curate(m, [{"pixel_values": pv, "image_grid_thw": grid}], start=0, tau=2, candidates=4)
    vis = m.model.visual
    with torch.no_grad():
        ref = ref_qwen_tower(m, pv, grid, rc, quant and quant[1])
        plain = ref_qwen_tower(m, pv, grid)
        feed = vis.merger.register_forward_pre_hook(lambda mod, a: (ref,))
        try:
            want = m(**inputs).logits
        finally:
            feed.remove()
        mmsink.wrap(m, regcache=rc, quant_vision=quant and quant[0])
        try:
            got = vis(pv, grid_thw=grid).last_hidden_state
            logits = m(**inputs).logits
        finally:
            mmsink.unwrap(m)
        again = vis(pv, grid_thw=grid).last_hidden_state
    torch.testing.assert_close(again, plain, atol=1e-10, rtol=1e-10)  # the reference is the plain tower
    assert (ref - plain).abs().max() > 1e-3
    tol = 2e-6 if quant else 1e-10
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    assert (logits - want).abs().max() <= tol * 10 * want.abs().max()


def test_qwen_cached_states_equal_recomputed():
    """Qwen2-VL's registers: each block's keys / values (no rotary) of the sensitive block's largest-|h|
    rows, recomputed here from the plain tower's block inputs, averaged."""
    m = tiny.tiny_qwen(layers=2).double()
    inputs, _ = tiny.qwen_batch([(2, 3, [(4, 4)]), (1, 2, [(4, 6)])])
    pv, grid = inputs["pixel_values"].double(), inputs["image_grid_thw"]
    rc = regcache.curate(
        m, [{"pixel_values": pv, "image_grid_thw": grid}], sensitive=1, start=0, tau=1, candidates=3
    )
    blocks = m.model.visual.blocks
    rows = []
    taps = [
        b.register_forward_pre_hook(lambda mod, a, kw: rows.append(a[0]), with_kwargs=True) for b in blocks
    ]
    with torch.no_grad():
        m.model.visual(pv, grid_thw=grid)
        for t in taps:
            t.remove()
        top = rows[1].abs().amax(-1).topk(3).indices
        for i, b in enumerate(blocks):
            qkv = b.attn.qkv(b.norm1(rows[i][top])).view(3, 3, b.attn.num_heads, -1)
            torch.testing.assert_close(rc.keys[i], qkv[:, 1].mean(0).float(), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(rc.values[i], qkv[:, 2].mean(0).float(), atol=1e-6, rtol=1e-6)
