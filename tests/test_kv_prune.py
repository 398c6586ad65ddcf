"""The sink + window cache after a pruned prefill (issue 17): ``wrap(model, prune=..., kv={"window": W})``.
The policy runs on the stream (pruned columns included); each layer keeps the kept columns it holds,
at their compacted stream positions."""

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
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import mmsink
from mmsink.kv.planned import PlanWindowCache

model, unwrapped = module_model(lambda: tiny_llava(layers=4))


def stream_kept(mask_row, n_new, first, window):
    """Plain model of the policy on the stream: per forward append its real columns, keep the first
    ``first`` and the last ``window``."""
    length = len(mask_row)
    kept = []
    for cols in [[c for c in range(length) if mask_row[c]]] + [[length + j] for j in range(n_new - 1)]:
        kept = kept + cols
        kept = [c for i, c in enumerate(kept) if i < first or i >= len(kept) - window]
    return kept


@pytest.mark.parametrize("method,budget", KV_PRUNERS)
def test_window_covering_everything_equals_the_pruned_plain_cache(model, method, budget):
    inputs = batch(two_prompts())
    mmsink.wrap(model, prune=method, budget=budget)
    ref = greedy(model, inputs, 10)
    mmsink.wrap(model, prune=method, budget=budget, kv={"window": 10_000})
    out = greedy(model, inputs, 10)
    assert isinstance(out.past_key_values, PlanWindowCache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method,budget", KV_PRUNERS)
def test_each_layer_keeps_its_columns_of_the_window_at_stream_positions(model, method, budget):
    """Kept columns per layer == (stream policy) & (the layer's pruned set); keys == the layer's raw keys
    rotated afresh at the column's rank among the stream's kept columns."""
    inputs = batch(two_prompts())
    n, first, window = 12, 6, 30
    mmsink.wrap(model, prune=method, budget=budget)
    greedy(model, inputs, n)
    kept_visual = mmsink.stats(model).kept_indices
    lm = model.model.language_model
    raw = {i: [] for i in range(len(lm.layers))}

    def grab(i):  # at the attention's entry: PDrop also runs the next layer's k_proj to score
        def hook(m, args, kwargs):
            raw[i].append(m.k_proj(kwargs["hidden_states"]).detach())

        return hook

    hooks = [
        layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True)
        for i, layer in enumerate(lm.layers)
    ]
    try:
        mmsink.wrap(model, prune=method, budget=budget, kv={"window": window, "sinks": first})
        cache = greedy(model, inputs, n).past_key_values
    finally:
        for h in hooks:
            h.remove()
    text = model.config.text_config
    heads, dim = text.num_key_value_heads, text.head_dim
    evicted_image = False
    for b, (ids, row) in enumerate(zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist())):
        stream = stream_kept(row, n, first, window)
        assert cache.kept_origins()[b] == stream
        for i, layer in enumerate(cache.layers):
            held = held_columns(ids, row, kept_visual[i][b], n - 1)  # the last token is not cached
            want = [c for c in stream if c in held]
            assert cache.kept_origins_of(i)[b] == want
            evicted_image |= len(want) < len(stream)
            # raw keys by column: the prefill's slots are the held prompt columns, left-padded
            prompt_cols = [c for c in held if c < len(row)]
            by_col = dict(zip(prompt_cols, raw[i][0][b, -len(prompt_cols) :], strict=True))
            by_col.update({len(row) + j: r[b, 0] for j, r in enumerate(raw[i][1:])})
            k = torch.stack([by_col[c] for c in want]).view(1, len(want), heads, dim).transpose(1, 2)
            pos = torch.tensor([[stream.index(c) for c in want]])
            cos, sin = lm.rotary_emb(k, pos)
            fresh, _ = apply_rotary_pos_emb(k, k, cos, sin)
            valid = cache.segment_valid[cache.layer_segment[i]][b]
            torch.testing.assert_close(layer.keys[b][:, valid], fresh[0], rtol=1e-5, atol=1e-5)
    assert evicted_image  # some layer holds fewer columns than the stream: pruning shows


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_equals_per_sample(model, beams):
    mmsink.wrap(model, prune="fastv", budget=4, kv={"window": 9, "sinks": 4})
    out = check_batched_equals_alone(model, 12, beams)
    assert out.past_key_values.compacted


def test_auto_sinks_flagged_in_a_pruned_layer():
    """The detector reads a pruned layer's slots: a flagged text token mid-prompt survives eviction."""
    channel = 5
    model, p, col = massive_token_model(channel)
    opts = {"window": 6, "sinks": "auto", "first": 2, "sink_dims": [channel], "tau": 5.0, "sink_layer": 3}
    mmsink.wrap(model, prune="fastv", budget=4, kv=opts)
    cache = greedy(model, batch([p]), 20, output_scores=False).past_key_values
    kept = cache.kept_origins()[0]
    assert col in kept and col not in kept[:2] + kept[-6:]
    assert all(col in cache.kept_origins_of(i)[0] for i in range(4))


def test_var_is_refused(model):
    with pytest.raises(ValueError, match="does not combine with var"):
        mmsink.wrap(model, var={"sink_dims": (1,)}, kv={"window": 8})
    with pytest.raises(ValueError, match="quant does not combine with sink_forward"):
        mmsink.wrap(model, sink_forward=True, kv={"quant": "int4"})


def test_qwen_pruned_window_batched_equals_per_sample():
    """Qwen2-VL: FastV, then eviction on 3-D positions; covering window == pruned plain cache, batched ==
    per sample (the kept image tokens keep their grid layout through the run rule)."""
    from test_kv_mrope import SPECS, one_of
    from tiny import qwen_batch, tiny_qwen

    model = tiny_qwen(layers=4)
    inputs, ps = qwen_batch(SPECS)
    mmsink.wrap(model, prune="fastv", budget=3)
    ref = greedy(model, inputs, 8)
    mmsink.wrap(model, prune="fastv", budget=3, kv={"window": 10_000})
    out = greedy(model, inputs, 8)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    mmsink.wrap(model, prune="fastv", budget=3, kv={"window": 8, "sinks": 7})
    out = greedy(model, inputs, 12)
    assert isinstance(out.past_key_values, PlanWindowCache) and out.past_key_values.compacted
    width = inputs["input_ids"].shape[1]
    for i, p in enumerate(ps):
        alone = greedy(model, one_of(inputs, ps, i), 12)
        assert torch.equal(out.sequences[i, width:], alone.sequences[0, len(p) :])
        for a, b in zip(out.scores, alone.scores, strict=True):
            torch.testing.assert_close(a[i], b[0], rtol=1e-4, atol=1e-4)
