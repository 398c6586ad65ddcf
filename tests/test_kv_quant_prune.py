"""The quantized KV cache after a pruned prefill (issue 17): ``wrap(model, prune=..., kv={"quant": ...})``.
Each layer quantizes the tokens it holds, in groups by its own ranks; the tokens kept in full precision
are the stream's first ``first`` real columns (whichever layers hold them)."""

from __future__ import annotations

import pytest
import torch
from tiny import (
    KV_PRUNERS,
    batch,
    check_batched_equals_alone,
    greedy,
    held_columns,
    massive_token_model,
    module_model,
    tiny_llava,
    two_prompts,
)
from transformers.cache_utils import DynamicCache

import mmsink
from mmsink.core.cache import PlanCache
from mmsink.kv.planned import PlanQuantCache
from mmsink.kv.store import affine, decode

model, unwrapped = module_model(lambda: tiny_llava(layers=4))


@pytest.mark.parametrize("method,budget", KV_PRUNERS)
def test_highest_precision_equals_the_pruned_plain_cache(model, method, budget):
    inputs = batch(two_prompts())
    mmsink.wrap(model, prune=method, budget=budget)
    ref = greedy(model, inputs, 10)
    mmsink.wrap(model, prune=method, budget=budget, kv={"quant": "int16", "group_size": 4})
    out = greedy(model, inputs, 10)
    cache = out.past_key_values
    assert isinstance(cache, PlanQuantCache) and not all(cache.segment_full[s] for s in cache.layer_segment)
    assert all(any(p.chunks for p in layer.parts) for layer in cache.layers)  # it did quantize
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def dequantized(k, v, full, g: int, bits: int):
    """Plain loops: keys [H, n, D] / values of one layer's held tokens (n a multiple of g) quantized group
    by group with the shared rule (keys per channel over g tokens, values per token over channel groups);
    ``full`` [n] tokens are left out of the key scales and written back exactly."""
    k, v = k.clone(), v.clone()
    h, n, d = k.shape
    cg = min(g, d)
    for s in range(0, n, g):
        m = full[s : s + g]
        rows = k[:, s : s + g].transpose(1, 2)  # [H, D, g]
        floor = rows[..., ~m].amin(-1, keepdim=True) if (~m).any() else torch.zeros_like(rows[..., :1])
        rows = torch.where(m, floor, rows)
        q, sc, off = affine(rows.reshape(-1, g), bits)
        deq = decode(q, sc, off, bits, k.dtype).view(h, d, g).transpose(1, 2)
        vq, vs, vo = affine(v[:, s : s + g].reshape(-1, cg), bits)
        vdeq = decode(vq, vs, vo, bits, v.dtype).view(h, g, d)
        keep = m.nonzero()[:, 0]
        deq[:, keep], vdeq[:, keep] = k[:, s : s + g][:, keep], v[:, s : s + g][:, keep]
        k[:, s : s + g], v[:, s : s + g] = deq, vdeq
    return k, v


@pytest.mark.parametrize("method,budget", KV_PRUNERS[:2])
@pytest.mark.parametrize("bits", [4, 2])
def test_low_bit_equals_a_plain_reference(model, monkeypatch, method, budget, bits):
    """A plain PlanCache run whose decode steps attend to each layer's held keys / values with every
    complete group (by the layer's ranks, before this step) quantized from scratch by ``dequantized``;
    the first ``first`` stream columns exact. The first 6 columns include image tokens that FastV drops
    in its pruned layers, so a layer-rank rule would differ."""
    inputs, n, g, first = batch(two_prompts()), 14, 8, 6
    mmsink.wrap(model, prune=method, budget=budget)
    greedy(model, inputs, 1)
    kept_visual = mmsink.stats(model).kept_indices
    ids, mask = inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()

    def reference_update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = DynamicCache.update(self, key_states, value_states, layer_idx, *args, **kwargs)
        if not self.planned:  # the prefill attends in full precision (groups seal after the forward)
            return keys, values
        keys, values = keys.clone(), values.clone()
        q = key_states.shape[2]
        valid = self.segment_valid[self.layer_segment[layer_idx]]
        for b in range(keys.shape[0]):
            slots = valid[b].nonzero()[:, 0]
            old = int(valid[b, :-q].sum())
            cols = held_columns(ids[b], mask[b], kept_visual[layer_idx][b], len(slots))[: len(slots)]
            real = [c for c in range(len(mask[b])) if mask[b][c]]
            full = torch.tensor([c in real[:first] for c in cols])
            done = old // g * g
            at = slots[:done]
            k, v = dequantized(keys[b][:, at], values[b][:, at], full[:done], g, bits)
            keys[b][:, at], values[b][:, at] = k, v
        return keys, values

    with monkeypatch.context() as m:
        m.setattr(PlanCache, "update", reference_update)
        ref = greedy(model, inputs, n)
    kv = {"quant": f"int{bits}", "group_size": g, "sinks": first}
    mmsink.wrap(model, prune=method, budget=budget, kv=kv)
    out = greedy(model, inputs, n)
    assert isinstance(out.past_key_values, PlanQuantCache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    mmsink.wrap(model, prune=method, budget=budget)
    plain = greedy(model, inputs, n)
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(out.scores, plain.scores))  # visible


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_equals_per_sample(model, beams):
    mmsink.wrap(model, prune="fastv", budget=4, kv={"quant": "int4", "group_size": 4, "sinks": 5})
    out = check_batched_equals_alone(model, 12, beams)
    assert isinstance(out.past_key_values, PlanQuantCache)


def test_refused_in_one_line(model):
    with pytest.raises(ValueError, match="kv quant does not combine with prune='orthorank' yet"):
        mmsink.wrap(model, orthorank={"budget": 0.5}, kv={"quant": "int4"})
    with pytest.raises(ValueError, match="kv quant does not combine with sink_forward= yet"):
        mmsink.wrap(model, sink_forward=True, kv={"quant": "int4"})
    # generate_fast takes quant + prune= too: tests/test_kv_fast_quant_prune.py


def test_auto_sink_flagged_in_a_pruned_layer_is_exact_in_every_layer():
    """The detector reads a pruned layer's slots (sink_layer 3, after FastV's cut): the flagged text token
    mid-prompt is an exact entry of every layer, at its rank among that layer's tokens."""
    channel = 5
    model, p, col = massive_token_model(channel)
    kv = {"quant": "int4", "group_size": 4, "sinks": "auto", "first": 2, "sink_dims": [channel], "tau": 5.0}
    mmsink.wrap(model, prune="fastv", budget=4, kv={**kv, "sink_layer": 3})
    inputs = batch([p])
    cache = greedy(model, inputs, 12, output_scores=False).past_key_values
    kept_visual = mmsink.stats(model).kept_indices
    sizes = set()
    for i, layer in enumerate(cache.layers):
        cols = held_columns(p, [1] * len(p), kept_visual[i][0], 0)
        sizes.add(len(cols))
        assert cols.index(col) in layer.parts[0].sink_rank and {0, 1} <= set(layer.parts[0].sink_rank)
    assert len(sizes) > 1  # layers hold different token sets
