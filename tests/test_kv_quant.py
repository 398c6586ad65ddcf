"""KVSink-style fake-quantized KV cache (issue 17): ``wrap(model, kv={"quant": "int4"})``."""

from __future__ import annotations

import pytest
import torch
from tiny import GREEDY_SCORES, batch, module_model, pixels_of, prompt, tiny_llava, two_prompts
from transformers.cache_utils import DynamicCache

import mmsink
from mmsink.kv.quant import QuantCache

model, unwrapped = module_model(lambda: tiny_llava(layers=3))


def prefill(model, inputs, kv=None):
    if kv is not None:
        mmsink.wrap(model, kv=kv)
    with torch.no_grad():
        start = None if kv else DynamicCache()
        cache = model(**inputs, past_key_values=start, use_cache=True).past_key_values
    if kv is not None:
        mmsink.unwrap(model)
    return cache


def check_groups(plain, quant, valid, full, group: int, bits: int):
    """Plain loops: every complete group of non-full slots is min-max quantized within half a step (keys
    per channel over the group's tokens, values per token over channel groups); the rest is bitwise."""
    levels = 2**bits - 1
    for lp, layer in zip(plain.layers, quant.layers, strict=True):
        keys, values = layer.full(valid, group)  # dequantized from the stored codes
        for b in range(valid.shape[0]):
            slots = valid[b].nonzero()[:, 0].tolist()
            complete = len(slots) // group * group
            untouched = [s for i, s in enumerate(slots) if i >= complete or full[b, s]]
            assert torch.equal(keys[b][:, untouched], lp.keys[b][:, untouched])
            assert torch.equal(values[b][:, untouched], lp.values[b][:, untouched])
            for g in range(complete // group):
                members = [s for s in slots[g * group : (g + 1) * group] if not full[b, s]]
                k = lp.keys[b][:, members]  # [H, n, D]
                step = (k.amax(1, keepdim=True) - k.amin(1, keepdim=True)) / levels
                assert ((keys[b][:, members] - k).abs() <= step / 2 + 1e-6).all()
                v = lp.values[b][:, members]
                d = v.shape[-1]
                vg = v.view(*v.shape[:2], d // min(group, d), min(group, d))
                vstep = ((vg.amax(-1, keepdim=True) - vg.amin(-1, keepdim=True)) / levels).expand_as(vg)
                err = (values[b][:, members] - v).abs().view_as(vg)
                assert (err <= vstep / 2 + 1e-6).all()
                assert not torch.equal(keys[b][:, members], k)  # it did quantize


@pytest.mark.parametrize("bits,keep", [("int4", True), ("int2", True), ("int8", False)])
def test_dequantized_within_the_format_bound_and_sinks_bitwise(model, bits, keep):
    inputs = batch(two_prompts())
    plain = prefill(model, inputs)
    quant = prefill(model, inputs, {"quant": bits, "group_size": 8, "sinks": 4, "keep_sinks": keep})
    assert isinstance(quant, QuantCache)
    valid = quant.valid
    rank = valid.long().cumsum(1) - 1
    full = valid & (rank < 4) if keep else torch.zeros_like(valid)
    check_groups(plain, quant, valid, full, 8, quant.cfg.bits)


def test_sixteen_bits_equal_the_plain_cache(model):
    inputs = batch(two_prompts())
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=10, **GREEDY_SCORES)
    mmsink.wrap(model, kv={"quant": "int16", "group_size": 4})
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, **GREEDY_SCORES)
    assert isinstance(out.past_key_values, QuantCache)
    assert bool(out.past_key_values.done.any())
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_batched_equals_per_sample(model):
    ps = two_prompts()
    inputs = batch(ps)
    mmsink.wrap(model, kv={"quant": "int4", "group_size": 8})
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, **GREEDY_SCORES)
        width = inputs["input_ids"].shape[1]
        for i, p in enumerate(ps):
            one = batch([p])
            one["pixel_values"] = pixels_of(inputs, ps, i)
            alone = model.generate(**one, max_new_tokens=12, **GREEDY_SCORES)
            assert torch.equal(out.sequences[i, width:], alone.sequences[0, len(p) :])
            for a, b in zip(out.scores, alone.scores, strict=True):
                torch.testing.assert_close(a[i], b[0], rtol=1e-4, atol=1e-4)
            qa, qb = out.past_key_values, alone.past_key_values
            for la, lb in zip(qa.layers, qb.layers, strict=True):
                ka, kb = la.full(qa.valid, 8)[0], lb.full(qb.valid, 8)[0]
                torch.testing.assert_close(ka[i][:, qa.valid[i]], kb[0][:, qb.valid[0]])


def test_auto_sinks_stay_in_full_precision():
    model = tiny_llava(layers=3)
    channel, token = 5, 7
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[token, channel] = 400.0
    p = prompt(3, 12, seed=4)
    p[len(p) - 9] = token
    inputs = batch([p])
    plain = prefill(model, inputs)
    kv = {"quant": "int4", "group_size": 8, "sinks": "auto", "first": 1, "sink_dims": [channel], "tau": 5.0}
    quant = prefill(model, inputs, {**kv, "sink_layer": 1})
    col = len(p) - 9
    assert quant.sink[0].nonzero()[:, 0].tolist() == [col]
    full = quant.valid & ((quant.valid.long().cumsum(1) - 1 < 1) | quant.sink)
    check_groups(plain, quant, quant.valid, full, 8, 4)
    for lp, lq in zip(plain.layers, quant.layers, strict=True):
        assert torch.equal(lq.full(quant.valid, 8)[0][0][:, col], lp.keys[0][:, col])


def test_qwen_m_rope_sixteen_bits_equal_the_plain_cache():
    from tiny import qwen_batch, tiny_qwen

    model = tiny_qwen(layers=2)
    inputs, _ = qwen_batch([(3, 5, [(4, 4)]), (6, 9, [(4, 8)])])
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=8, **GREEDY_SCORES)
        mmsink.wrap(model, kv={"quant": "int16", "group_size": 4})
        out = model.generate(**inputs, max_new_tokens=8, **GREEDY_SCORES)
    assert isinstance(out.past_key_values, QuantCache) and bool(out.past_key_values.done.any())
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_storage_is_low_bit(model, bits):
    """Bytes held == a count from the format: packed codes (bits per value), one fp32 scale and minimum
    per group, full-precision tails and sinks; int4 holds well under half of the fp32 cache."""
    inputs = batch(two_prompts())
    g, sinks = 8, 4
    quant = prefill(model, inputs, {"quant": f"int{bits}", "group_size": g, "sinks": sinks})
    text = model.config.text_config
    h, d = text.num_key_value_heads, text.head_dim
    want = 0
    for n in quant.valid.sum(1).tolist():  # per sample: n real tokens, the first ``sinks`` exact
        q = n // g * g
        want += q * h * d * bits // 8 * 2  # key and value codes
        want += (h * (q // g) * d + h * q * (d // min(g, d))) * 2 * 4  # scale and minimum per group
        want += (n - q + sinks) * h * d * 4 * 2  # tail and sinks, fp32 keys and values
    assert quant.nbytes() == want * len(quant.layers)
    plain = sum(2 * n * h * d * 4 for n in quant.valid.sum(1).tolist()) * len(quant.layers)
    if bits == 4:
        assert quant.nbytes() < 0.5 * plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,rows,group", [(4, 7, 32), (2, 13, 16), (4, 64, 128)])
def test_codes_unpacked_here_equal_quantos_dequantize(monkeypatch, dtype, bits, rows, group):
    """The store dequantizes without quanto's unpack op (a C++ extension built on first use on CUDA):
    bitwise equal to quanto's own ``dequantize()``; bf16 groups of 128 stay in the plain packed layout
    (quanto would swap in TinyGemm's, whose bytes and scales the store could not count)."""
    from optimum.quanto import WeightQBitsTensor
    from optimum.quanto.tensor.packed import PackedTensor

    from mmsink.kv.store import pack, stored_bytes, unpack

    x = torch.randn(rows, group, generator=torch.Generator().manual_seed(bits + rows), dtype=dtype)
    stored = pack(x, bits)
    assert type(stored) is WeightQBitsTensor
    want = stored.dequantize()
    monkeypatch.setattr(PackedTensor, "unpack", lambda self: pytest.fail("quanto's unpack op was called"))
    got = unpack(stored, dtype)
    assert torch.equal(got, want.to(dtype))
    step = (x.float().amax(1, keepdim=True) - x.float().amin(1, keepdim=True)) / (2**bits - 1)
    eps = torch.finfo(dtype).eps  # bf16 rounds scale, minimum and result: a few ulps of the row's range
    slack = 4 * eps * x.float().abs().amax(1, keepdim=True) + 1e-6
    assert ((got.float() - x.float()).abs() <= step / 2 + slack).all()
    scale_bytes = 2 * rows * x.element_size()
    assert stored_bytes(stored) == (rows + (-rows) % (8 // bits)) * group * bits // 8 + scale_bytes
