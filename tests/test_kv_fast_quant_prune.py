"""generate_fast with the KVSink quantized cache after a pruned prefill (issue 17;
``mmsink.kv.fast_quant``): ``wrap(model, prune=..., kv={"quant": ...})`` gives ``generate``'s tokens
(``mmsink.kv.planned.PlanQuantCache``) with layers that hold different token sets, and its store reads as
that cache."""

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
    prompt,
    prompts_with,
    qwen_batch,
    replay_stand_in,
    tiny_qwen,
)

import mmsink
from mmsink.fast import decode as fastmod
from mmsink.fast.store import STORE
from mmsink.kv.planned import PlanQuantCache
from mmsink.kv.quant import kept_full

CHANNEL, TOKEN, DECODED = 5, 7, 45  # a massive channel on token 7 (mid-prompt) and on a token decoded often
# FastV: one cut at layer 2; PDrop: three stages (four segments); VisionZip: before the LLM (every layer
# on one pruned segment); DART: one cut at layer 2
PRUNERS = [("fastv", 4), ("pdrop", 24), ("visionzip", 6), ("dart", 6)]
AUTO = {"sinks": "auto", "first": 2, "sink_dims": [CHANNEL], "tau": 5.0, "sink_layer": 3}  # a pruned layer


@pytest.fixture(scope="module")
def model():
    """A tiny LLaVA where two tokens carry a massive activation (as test_kv_fast_quant's "auto" model)."""
    return massive_llava((TOKEN, DECODED), CHANNEL)


@pytest.fixture(autouse=True)
def unwrapped(model):
    yield
    if model.__dict__.get("_mmsink") is not None:
        mmsink.unwrap(model)


def prompts():
    """Left-padded batch of two (45 and 57 tokens), token 7 in the middle of the second."""
    return prompts_with(TOKEN)


def last_decoder(model):
    return next(reversed(model.__dict__[STORE].values()))


def generated(model, inputs, n):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)


def plain_prefill(model, inputs):
    """The pruned prefill's unquantized PlanCache (the wrap's pruner, no kv), positions as generate's."""
    mask = inputs["attention_mask"]
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        return model(**inputs, position_ids=pos, use_cache=True).past_key_values


def same_store(dec, cache, g: int) -> set:
    """The decoder's store reads as generate's PlanQuantCache: per layer its segment's slots, quantized
    flags and dequantized keys / values (layer 0, whose keys both compute from the same embeddings,
    bitwise; deeper layers to fp32 rounding, far below one quantization step); the stream's slots and
    sink flags. Returns the layers' widths."""
    t = cache.valid.shape[1]
    assert torch.equal(dec.ok[:, :t], cache.valid) and torch.equal(dec.sink[:, :t], cache.sink)
    widths = set()
    for i, layer in enumerate(cache.layers):
        seg, s = cache.layer_segment[i], dec.layer_seg[i]
        valid = cache.segment_valid[seg]
        w = valid.shape[1]
        widths.add(w)
        assert torch.equal(dec.seg_ok[s][:, :w], valid) and not dec.seg_ok[s][:, w:].any()
        assert torch.equal(dec.sealed[s][:, :w], cache.seg_done[seg])
        mask = valid[:, None, :, None]
        for got, want in zip(dec.read(i), layer.full(valid, g), strict=True):
            got = torch.where(mask, got[:, :, :w], 0)
            if i == 0:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    return widths


INT4 = {"quant": "int4", "group_size": 4, "sinks": 5}
INT2_AUTO = {"quant": "int2", "group_size": 8, **AUTO}


@pytest.mark.parametrize(
    "method,budget,kv", [(m, b, INT2_AUTO) for m, b in PRUNERS] + [(m, b, INT4) for m, b in PRUNERS[:2]]
)
def test_same_tokens_and_store_as_generate(model, method, budget, kv):
    """Tokens equal; after the run the store reads as generate's PlanQuantCache (``same_store``), and a
    pruned segment sealed groups during decode."""
    inputs, n, g = batch(prompts()), 24, kv["group_size"]
    mmsink.wrap(model, prune=method, budget=budget, kv=kv)
    out = fast(model, inputs, n)
    dec = last_decoder(model)
    ref = generated(model, inputs, n)
    cache = ref.past_key_values
    assert isinstance(cache, PlanQuantCache)
    assert torch.equal(out, ref.sequences)
    t = cache.valid.shape[1]
    assert min(same_store(dec, cache, g)) < t  # some layers hold fewer tokens than the stream
    pruned = [s for s, w in enumerate(cache.segment_valid) if w.shape[1] < t and s in cache.layer_segment]
    assert any(cache.seg_done[s][:, -(n - 1) :].any() for s in pruned)  # a pruned segment sealed in decode
    if kv is INT2_AUTO:  # 2 bits change the answer here
        mmsink.wrap(model, prune=method, budget=budget)
        assert not torch.equal(out, fast(model, inputs, n))


@pytest.mark.parametrize("method,budget", PRUNERS[:3])
def test_sixteen_bits_equal_plain_pruned_generate_fast(model, method, budget):
    inputs = batch(prompts())
    mmsink.wrap(model, prune=method, budget=budget)
    ref = fast(model, inputs, 20)
    mmsink.wrap(model, prune=method, budget=budget, kv={"quant": "int16", "group_size": 4})
    assert torch.equal(fast(model, inputs, 20), ref)
    dec = last_decoder(model)
    assert all(sealed.any() for sealed in dec.sealed)


@pytest.mark.parametrize(
    "method,budget,kv", [("fastv", 4, {"sinks": 5}), ("pdrop", 24, AUTO), ("visionzip", 6, AUTO)]
)
def test_kept_sinks_are_bitwise_the_unquantized_keys(model, method, budget, kv):
    """In every layer, the kept-full tokens of quantized groups (the stream's first tokens and, with
    "auto", the tokens flagged at a pruned layer, looked up through each slot's stream slot) read bitwise
    as the unquantized pruned prefill's keys / values (prompt slots) and as generate's exact copies
    (decoded slots, layer 0); their non-sink group mates are quantized."""
    inputs, n = batch(prompts()), 24
    mmsink.wrap(model, prune=method, budget=budget)
    plain = plain_prefill(model, inputs)
    mmsink.wrap(model, prune=method, budget=budget, kv={"quant": "int4", "group_size": 8, **kv})
    fast(model, inputs, n)
    dec = last_decoder(model)
    cache = generated(model, inputs, n).past_key_values
    length = inputs["input_ids"].shape[1]
    full_stream = kept_full(dec.cfg, dec.ok, dec.sink, dec.rank)
    if kv is AUTO:
        assert full_stream[1, length - 8]  # the prompt's token 7, flagged at a pruned layer
    decoded = False
    for i, layer in enumerate(plain.layers):
        s = dec.layer_seg[i]
        w = layer.keys.shape[2]  # the segment's prompt slots
        ok, sealed = dec.seg_ok[s], dec.sealed[s][:, :-1]
        full = full_stream.gather(1, dec.origin[s]) & ok & sealed
        assert torch.equal(dec.xmap[s][:, :-1] < dec.entries, full)
        assert full[:, :w].any()
        kb, vb = dec.read(i)
        mates = ok[:, :w] & sealed[:, :w] & ~full[:, :w]
        for b in range(2):
            at = full[b, :w].nonzero()[:, 0]
            assert torch.equal(kb[b][:, at], layer.keys[b][:, at])
            assert torch.equal(vb[b][:, at], layer.values[b][:, at])
            m = mates[b].nonzero()[:, 0]
            assert len(m) and not torch.equal(kb[b][:, m], layer.keys[b][:, m])
        if i == 0:
            valid = cache.segment_valid[cache.layer_segment[0]]
            k0, v0 = cache.layers[0].full(valid, 8)
            for b in range(2):
                at = full[b, w : valid.shape[1]].nonzero()[:, 0] + w
                decoded |= len(at) > 0
                assert torch.equal(kb[b][:, at], k0[b][:, at]) and torch.equal(vb[b][:, at], v0[b][:, at])
    if kv is AUTO and method == "pdrop":  # this run decodes token 45 (flagged) in a sealed group
        assert decoded


@pytest.mark.parametrize("method,budget", [("fastv", 4), ("visionzip", 6)])
def test_batched_equals_per_sample(model, method, budget):
    """A left-padded batch of two == each sample alone: groups follow each sample's own ranks in each
    segment."""
    ps = prompts()
    mmsink.wrap(model, prune=method, budget=budget, kv={"quant": "int4", "group_size": 4, "sinks": 5})
    n = 20
    check_fast_batched_equals_alone(model, ps, n)


def test_qwen_mrope_with_fastv():
    """Qwen2-VL's 3-D positions (images of two sizes and a text-only sample), pruned by FastV."""
    qwen = tiny_qwen(layers=4)
    inputs, _ = qwen_batch([(4, 6, [(8, 12)]), (3, 5, [])], seed=1)
    kv = {"quant": "int2", "group_size": 4}
    out, ref = fast_and_generate(qwen, inputs, n=16, kv=kv, prune="fastv", budget=6)
    assert torch.equal(out, ref)


def test_a_mask_with_gaps_gives_generates_tokens_and_store(model):
    """A gap next to a prompt's end (the rings follow ranks, not slots)."""
    inputs = batch(prompts())
    inputs["attention_mask"][1, -3:-1] = 0
    mmsink.wrap(model, prune="fastv", budget=4, kv=INT4)
    out = fast(model, inputs, 16)
    ref = generated(model, inputs, 16)
    assert torch.equal(out, ref.sequences)
    same_store(last_decoder(model), ref.past_key_values, 4)


def test_replayed_steps_and_no_device_reads(model, monkeypatch):
    """The graphed path on CPU (capture replaced by a stand-in: warm-up step, replay = the step), so
    ``fill`` must undo the warm-up; the step reads nothing from the device."""
    captured, ops = [], SyncOps()

    monkeypatch.setattr(fastmod, "capture_graph", replay_stand_in(captured, ops))
    mmsink.wrap(model, prune="pdrop", budget=24, kv={"quant": "int4", "group_size": 8, **AUTO})
    for seed in (0, 1):
        inputs = batch([prompt(3, 5, seed=1 + seed), prompt(9, 11, seed=3 + seed)], seed=seed)
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert torch.equal(fast(model, inputs, 12, graphs=True), ref)
    assert len(captured) == 1 and not ops.seen


def test_what_does_not_combine_is_refused_in_one_line(model):
    """Still refused with quant: OrthoRank (its selection layers write keys directly) and sink_forward= at
    wrap, as for generate; generate_fast's step= options with any kv mode."""
    with pytest.raises(ValueError, match="kv quant does not combine with prune='orthorank' yet"):
        mmsink.wrap(model, orthorank={"budget": 0.5}, kv={"quant": "int4"})
    with pytest.raises(ValueError, match="kv quant does not combine with sink_forward= yet"):
        mmsink.wrap(model, prune="fastv", budget=4, sink_forward=True, kv={"quant": "int4"})
    mmsink.wrap(model, prune="fastv", budget=4, kv={"quant": "int4"})
    with pytest.raises(ValueError, match="step= options do not apply to the kv quant mode yet"):
        fast(model, batch(prompts()), 4, step={"fuse": True})
