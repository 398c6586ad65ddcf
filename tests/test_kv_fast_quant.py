"""generate_fast with the KVSink quantized cache (issue 17; ``mmsink.kv.fast_quant``): the same tokens as
``generate`` with the same ``kv=`` quant config, on a static store of codes with a fixed-shape step."""

from __future__ import annotations

import optimum.quanto  # noqa: F401  (2 / 4 bits; its import takes seconds: at collection, not in a test)
import pytest
import torch
from test_selection_syncs import SyncOps
from tiny import (
    batch,
    check_fast_batched_equals_alone,
    fast,
    fast_and_generate,
    massive_llava,
    module_model,
    prompt,
    prompts_with,
    qwen_batch,
    replay_stand_in,
    tiny_llava,
    tiny_qwen,
)
from transformers.cache_utils import DynamicCache

import mmsink
from mmsink.fast import decode as fastmod
from mmsink.fast.store import STORE
from mmsink.kv import fast_quant

CHANNEL, TOKEN, DECODED = 5, 7, 45  # a massive channel on token 7 (mid-prompt) and on a token decoded often


model, unwrapped = module_model(lambda: tiny_llava(layers=3))


@pytest.fixture(scope="module")
def auto():
    """A tiny LLaVA where two tokens carry a massive activation (as test_kv_fast's): one in the prompts,
    one the model generates, so decode steps flag sinks too. Hidden size 64: |x_d| / RMS(x) <= 8, hence
    tau 5."""
    return massive_llava((TOKEN, DECODED), CHANNEL)


@pytest.fixture(autouse=True)
def auto_unwrapped(auto):
    yield
    if auto.__dict__.get("_mmsink") is not None:
        mmsink.unwrap(auto)


AUTO = {"sinks": "auto", "first": 2, "sink_dims": [CHANNEL], "tau": 5.0, "sink_layer": 1}


def prompts():
    """Left-padded batch of two (45 and 57 tokens), token 7 in the middle of the second."""
    return prompts_with(TOKEN)


def last_decoder(model):
    return next(reversed(model.__dict__[STORE].values()))


def plain_prefill(model, inputs):
    """The unquantized cache of the prompt, positions as generate gives left-padded prompts."""
    mask = inputs["attention_mask"]
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = model(**inputs, position_ids=pos, past_key_values=DynamicCache(), use_cache=True)
    return out.past_key_values


def same_store(dec, cache, g: int) -> None:
    """The decoder's store reads as generate's cache of the same tokens: layer 0 (whose keys both compute
    from the same embeddings) bitwise, deeper layers to fp32 rounding."""
    t = cache.valid.shape[1]
    mask = cache.valid[:, None, :, None]
    for i, layer in enumerate(cache.layers):
        for got, w in zip(dec.read(i), layer.full(cache.valid, g), strict=True):
            got = torch.where(mask, got[:, :, :t], 0)
            if i == 0:
                assert torch.equal(got, w)
            else:
                torch.testing.assert_close(got, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kv",
    [
        {"quant": "int4", "group_size": 8, "sinks": 4},
        {"quant": "int2", "group_size": 4, "sinks": 2},
        {"quant": "int8", "group_size": 16, "keep_sinks": False},
        {"quant": "int2", "group_size": 8, **AUTO},
    ],
)
def test_same_tokens_and_store_as_generate(model, auto, kv):
    """Tokens equal; after the run the store reads as generate's cache of the same tokens (layer 0, whose
    keys both compute from the same embeddings, bitwise; deeper layers to fp32 rounding, far below one
    quantization step); the same slots quantized."""
    model = auto if kv.get("sinks") == "auto" else model
    inputs = batch(prompts())
    n = 24
    mmsink.wrap(model, kv=kv)
    out = fast(model, inputs, n)
    dec = last_decoder(model)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
    cache = ref.past_key_values
    assert torch.equal(out, ref.sequences)
    t = cache.valid.shape[1]  # prompt + n - 1 fed tokens in both
    assert torch.equal(dec.ok[:, :t], cache.valid) and not dec.ok[:, t:].any()
    assert torch.equal(dec.sealed[0][:, :t], cache.done) and cache.done[:, -20:].any()  # decode sealed too
    assert torch.equal(dec.sink[:, :t], cache.sink)
    same_store(dec, cache, kv["group_size"])
    mmsink.unwrap(model)
    if kv["quant"] in ("int2", "int4") and model is not auto:  # low bits change the answer here
        assert not torch.equal(out, fast(model, inputs, n))


def test_sixteen_bits_equal_plain_generate_fast(model):
    inputs = batch(prompts())
    ref = fast(model, inputs, 20)
    mmsink.wrap(model, kv={"quant": "int16", "group_size": 4})
    assert torch.equal(fast(model, inputs, 20), ref)
    assert last_decoder(model).sealed[0].any()


@pytest.mark.parametrize("bits,g,per", [(4, 8, 2), (2, 8, 4), (2, 2, 1), (8, 8, 1)])
def test_codes_are_packed(model, bits, g, per):
    """2 / 4-bit codes packed along the group when it allows (``spread`` undoes ``squeeze`` on every code
    value); with groups of 8 the store holds less than half of the fp32 buffers at 4 / 2 bits."""
    q = torch.randint(0, 2**bits, (3, 5, 24), dtype=torch.uint8)
    assert torch.equal(fast_quant.spread(fast_quant.squeeze(q, per), per), q)
    assert fast_quant.squeeze(q, per).shape[-1] == 24 // per
    mmsink.wrap(model, kv={"quant": f"int{bits}", "group_size": g})
    fast(model, batch(prompts()), 4)
    dec = last_decoder(model)
    assert dec.per == per and dec.kc[0].shape[-1] == g // per and dec.vc[0].shape[-1] == g // per
    b, hk, d = dec.k[0].shape[0], dec.k[0].shape[1], dec.k[0].shape[3]
    plain = 2 * b * hk * dec.caps[0] * d * 4 * len(dec.layers)
    if bits < 8 and g == 8:  # (groups of 2 spend more on fp32 scales and offsets than on codes)
        assert dec.nbytes() < 0.5 * plain


@pytest.mark.parametrize("kv", [{"sinks": 4}, AUTO])
def test_kept_sinks_are_bitwise_the_unquantized_keys(auto, kv):
    """Sinks inside quantized groups (the first tokens; with "auto" also the flagged prompt token and the
    decoded token 76) read bitwise as the unquantized prefill's keys / values (prompt slots) and as
    generate's exact copies (decoded slots, layer 0); their non-sink group mates are quantized."""
    model = auto
    inputs = batch(prompts())
    plain = plain_prefill(model, inputs)
    mmsink.wrap(model, kv={"quant": "int4", "group_size": 8, **kv})
    n = 24
    fast(model, inputs, n)
    dec = last_decoder(model)
    with torch.no_grad():
        cache = model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
    cache = cache.past_key_values
    length, t = inputs["input_ids"].shape[1], cache.valid.shape[1]
    rank = dec.ok.long().cumsum(1) - 1
    full = dec.ok & ((rank < dec.cfg.first) | dec.sink) & dec.sealed[0][:, :-1]  # (one segment: the stream)
    if kv is AUTO:
        assert full[1, length - 8] and full[:, length:].any()  # the prompt's and a decoded sink
    assert full[:, :length].any() and torch.equal(dec.xmap[0][:, :-1] < dec.entries, full)
    mates = dec.ok[:, :length] & dec.sealed[0][:, :length] & ~full[:, :length]
    for i, layer in enumerate(plain.layers):
        kb, vb = dec.read(i)
        for b in range(2):
            s = full[b, :length].nonzero()[:, 0]
            assert torch.equal(kb[b][:, s], layer.keys[b][:, s])
            assert torch.equal(vb[b][:, s], layer.values[b][:, s])
            m = mates[b].nonzero()[:, 0]
            assert not torch.equal(kb[b][:, m], layer.keys[b][:, m])
    k0, v0 = cache.layers[0].full(cache.valid, 8)
    kb, vb = dec.read(0)
    for b in range(2):
        s = full[b, length:t].nonzero()[:, 0] + length
        assert torch.equal(kb[b][:, s], k0[b][:, s]) and torch.equal(vb[b][:, s], v0[b][:, s])


@pytest.mark.parametrize(
    "kv", [{"quant": "int4", "group_size": 8}, {"quant": "int2", "group_size": 4, **AUTO}]
)
def test_batched_equals_per_sample(model, auto, kv):
    """A left-padded batch of two == each sample alone (its own decoder, no padding): groups follow each
    sample's own ranks."""
    model = auto if kv.get("sinks") == "auto" else model
    ps = prompts()
    mmsink.wrap(model, kv=kv)
    n = 20
    check_fast_batched_equals_alone(model, ps, n)


def test_qwen_mrope():
    """Qwen2-VL's 3-D positions (images of two sizes and a text-only sample)."""
    qwen = tiny_qwen(layers=2)
    inputs, _ = qwen_batch([(4, 6, [(8, 12)]), (3, 5, [])], seed=1)
    out, ref = fast_and_generate(qwen, inputs, n=16, kv={"quant": "int2", "group_size": 4})
    assert torch.equal(out, ref)
    assert not torch.equal(out, fast(qwen, inputs, 16))


def test_replayed_steps_reused_decoder_and_no_device_reads(auto, monkeypatch):
    """The graphed path on CPU: capture replaced by a stand-in (warm-up step, replay = the step), so
    ``fill`` must undo the warm-up; a second call of the same shapes reuses the decoder; the step reads
    nothing from the device (counted as test_selection_syncs does)."""
    captured, ops = [], SyncOps()

    monkeypatch.setattr(fastmod, "capture_graph", replay_stand_in(captured, ops))
    model = auto
    mmsink.wrap(model, kv={"quant": "int4", "group_size": 8, **AUTO})
    for seed in (0, 1):
        inputs = batch([prompt(3, 5, seed=1 + seed), prompt(9, 11, seed=3 + seed)], seed=seed)
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert torch.equal(fast(model, inputs, 12, graphs=True), ref)
    assert len(captured) == 1 and not ops.seen


def test_full_entries_are_refused(auto, monkeypatch):
    """More decode tokens flagged as sinks than the spare entries: a clear error, not other tokens."""
    monkeypatch.setattr(fast_quant, "SPARE_SINKS", 0)
    monkeypatch.setattr(fast_quant, "ENTRIES_ROUND", 1)
    model = auto
    mmsink.wrap(model, kv={"quant": "int4", "group_size": 4, **AUTO})
    with pytest.raises(ValueError, match="quant store filled up"):
        fast(model, batch(prompts()), 24)


def test_a_mask_with_gaps_gives_generates_tokens_and_store(model):
    """The exact rings are indexed by rank, not slot: a gap among a prompt's last ``g`` slots (the group
    that completes in decode then spans more than ``g`` slots) gives generate's tokens and store."""
    inputs = batch(prompts())
    inputs["attention_mask"][1, -3:-1] = 0  # a gap next to the second prompt's end: 55 real tokens
    mmsink.wrap(model, kv={"quant": "int4", "group_size": 4, "sinks": 5})
    out = fast(model, inputs, 16)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out, ref.sequences)
    same_store(last_decoder(model), ref.past_key_values, 4)
