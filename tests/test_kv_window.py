"""The sink + window KV cache (issue 17, StreamingLLM): ``wrap(model, kv={"window": W, "sinks": S})``."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny import (
    IMAGE_TOKEN,
    SIDE,
    batch,
    check_batched_equals_alone,
    greedy,
    massive_token_model,
    module_model,
    prompt,
    tiny_llava,
    two_prompts,
)

import mmsink
from mmsink.kv import WindowCache

model, unwrapped = module_model(lambda: tiny_llava(layers=4))


def stream_policy(columns, n_forwards, first, window, sinks=()):
    """Plain model of the policy: per forward, append its real columns, then keep the first ``first``
    kept ones, the flagged ones and the last ``window``."""
    kept = []
    for cols in n_forwards(columns):
        kept = kept + cols
        kept = [c for i, c in enumerate(kept) if i < first or i >= len(kept) - window or c in sinks]
    return kept


def forwards_of(mask_row, n_new):
    """Column groups per forward of ``generate``: the prompt's real columns, then one per new token (the
    last new token is never fed)."""
    length = len(mask_row)

    def groups(_):
        yield [c for c in range(length) if mask_row[c]]
        for j in range(n_new - 1):
            yield [length + j]

    return groups


def test_window_covering_everything_equals_plain_cache(model):
    inputs = batch(two_prompts())
    ref = greedy(model, inputs, 12)
    mmsink.wrap(model, kv={"window": 10_000})
    out = greedy(model, inputs, 12)
    assert isinstance(out.past_key_values, WindowCache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("first,window", [(4, 8), (0, 6), (2, 30)])
def test_eviction_keeps_exactly_the_sinks_and_the_window(model, first, window):
    inputs = batch(two_prompts())
    n = 20
    mmsink.wrap(model, kv={"window": window, "sinks": first})
    out = greedy(model, inputs, n)
    cache = out.past_key_values
    kept = cache.kept_origins()
    for b, row in enumerate(inputs["attention_mask"].tolist()):
        assert kept[b] == stream_policy(None, forwards_of(row, n), first, window)
    assert cache.compacted
    # positions live in the cache: the kept keys sit at 0..k-1, the next token at k
    assert int(cache.valid.sum(1).max()) <= first + window


def test_rerotated_keys_equal_keys_computed_fresh_at_the_new_positions(model):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    raw = {i: [] for i in range(len(lm.layers))}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: raw[i].append(o.detach()))
        for i, layer in enumerate(lm.layers)
    ]
    try:
        inputs = batch(two_prompts())
        mmsink.wrap(model, kv={"window": 7, "sinks": 3})
        cache = greedy(model, inputs, 15).past_key_values
    finally:
        for h in hooks:
            h.remove()
    heads, dim = model.config.text_config.num_key_value_heads, model.config.text_config.head_dim
    for i, layer in enumerate(cache.layers):
        k_all = torch.cat(raw[i], 1)  # [B, columns, H*D], one row per stream column
        for b in range(k_all.shape[0]):
            valid = cache.valid[b]
            cols = cache.origin[b][valid]
            pos = torch.arange(len(cols))[None]  # fresh: each kept key at its cache slot
            k = k_all[b, cols].view(1, len(cols), heads, dim).transpose(1, 2)
            cos, sin = lm.rotary_emb(k, pos)
            fresh, _ = apply_rotary_pos_emb(k, k, cos, sin)
            torch.testing.assert_close(layer.keys[b][:, valid], fresh[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_equals_per_sample_with_left_padding(attn):
    model = tiny_llava(layers=4, attn=attn)
    mmsink.wrap(model, kv={"window": 9, "sinks": 4})
    out = check_batched_equals_alone(model, 16)
    assert out.past_key_values.compacted


def test_beam_search_equals_plain_cache_when_nothing_is_evicted(model):
    inputs = batch(two_prompts())
    ref = greedy(model, inputs, 10, num_beams=3, output_scores=False)
    mmsink.wrap(model, kv={"window": 10_000})
    out = greedy(model, inputs, 10, num_beams=3, output_scores=False)
    assert isinstance(out.past_key_values, WindowCache)
    assert torch.equal(out.sequences, ref.sequences)


def test_beam_search_with_eviction_reorders_the_bookkeeping(model):
    """Per sample == batched under eviction (beams of one sample move together with their slots)."""
    mmsink.wrap(model, kv={"window": 6, "sinks": 2})
    cache = check_batched_equals_alone(model, 12, beams=3).past_key_values
    assert cache.compacted and cache.valid.shape[0] == 6
    assert int(cache.valid.sum(1).max()) <= 8


def test_generation_runs_past_the_context_with_bounded_positions():
    model = tiny_llava(layers=2)
    model.config.text_config.max_position_embeddings = 64
    inputs = batch([prompt(2, 3, seed=3)])
    mmsink.wrap(model, kv={"window": 16, "sinks": 4})
    seen = []
    h = model.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda m, a, kw: seen.append(int(kw["position_ids"].max())), with_kwargs=True
    )
    try:
        out = greedy(model, inputs, 120, output_scores=False)
    finally:
        h.remove()
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 120 > 64 + 40
    assert max(seen[1:]) <= 4 + 16  # decode positions: at most sinks + window


def test_auto_sinks_keep_a_token_the_detector_flags():
    """Fixture: token 7's embedding gets a massive channel, so it acts as a sink mid-prompt. With a
    hidden size of 64, |x_d| / RMS(x) is at most 8, hence tau 5 here (20 on 4096-wide models)."""
    channel, token = 5, 7
    model, p, col = massive_token_model(channel, token)
    assert p.count(token) == 1
    inputs = batch([p])
    opts = {"window": 6, "sinks": "auto", "first": 2, "sink_dims": [channel], "tau": 5.0, "sink_layer": 1}
    mmsink.wrap(model, kv=opts)
    cache = greedy(model, inputs, 20, output_scores=False).past_key_values
    kept = cache.kept_origins()[0]
    assert col in kept and col not in kept[:2] + kept[-6:]
    assert kept == stream_policy(None, forwards_of([1] * len(p), 20), 2, 6, sinks={col})
    mmsink.wrap(model, kv={"window": 6, "sinks": 2})
    kept = greedy(model, inputs, 20, output_scores=False).past_key_values.kept_origins()[0]
    assert col not in kept


def two_turns(model, cache=None):
    """A chat: a first answer, then a new image and question fed with the cache of the first turn."""
    inputs = batch([prompt(3, 5, seed=1)])
    first = greedy(model, inputs, 5, past_key_values=cache)
    new = torch.tensor([[5, 6] + [IMAGE_TOKEN] * SIDE * SIDE + [7, 8]])
    ids = torch.cat([first.sequences, new], 1)
    pix = torch.randn(1, 3, 14 * SIDE, 14 * SIDE, generator=torch.Generator().manual_seed(5))
    turn = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix)
    return ids, greedy(model, turn, 6, past_key_values=first.past_key_values)


def test_a_second_turn_continues_the_window(model):
    _, ref = two_turns(model)
    mmsink.wrap(model, kv={"window": 10_000})
    _, out = two_turns(model)
    assert isinstance(out.past_key_values, WindowCache)
    assert torch.equal(out.sequences, ref.sequences)
    mmsink.wrap(model, kv={"window": 30, "sinks": 4})
    ids, out = two_turns(model)
    n1, n2 = len(prompt(3, 5, seed=1)), ids.shape[1]

    def groups(_):  # forwards: prompt, 4 decode steps, the second turn's new columns, 5 decode steps
        yield list(range(n1))
        yield from ([c] for c in range(n1, n1 + 4))
        yield list(range(n1 + 4, n2))
        yield from ([c] for c in range(n2, n2 + 5))

    assert out.past_key_values.kept_origins()[0] == stream_policy(None, groups, 4, 30)


@pytest.mark.parametrize(
    "kv,match",
    [
        ({"sinks": 4}, "needs a window"),
        ({"window": 0}, "window must be"),
        ({"window": 8, "sinks": -1}, "sinks must be"),
        ({"window": 8, "sinks": "auto"}, "needs sink_dims"),
        ({"window": 8, "sinks": "auto", "sink_dims": [999]}, "exceed the hidden size"),
        ({"window": 8, "sinks": "auto", "sink_dims": [1], "sink_layer": 9}, "sink_layer"),
        ({"window": 8, "size": 3}, "unknown kv option"),
        ({"sparse": "lfps", "topk": 0}, "topk must be"),
        ({"sparse": "lfps", "window": 8}, "sparse does not combine"),
        ({"quant": "int3"}, "quant must be one of"),
        ({"quant": "int4", "window": 8}, "do not combine"),
        ({"quant": "int4", "group_size": 12}, "does not divide"),
        ("big", "must be a dict"),
    ],
)
def test_bad_settings_raise_one_line(model, kv, match):
    with pytest.raises(ValueError, match=match) as e:
        mmsink.wrap(model, kv=kv)
    assert "\n" not in str(e.value)


def test_refused_combinations(model):
    with pytest.raises(ValueError, match="does not combine with var"):
        mmsink.wrap(model, var={"sink_dims": (1,)}, kv={"window": 8})
    with pytest.raises(ValueError, match="window and quant do not combine"):
        mmsink.wrap(model, kv={"window": 8, "sinks": 2, "quant": "int8"})


def test_unwrap_restores_the_plain_cache(model):
    inputs = batch(two_prompts())
    ref = greedy(model, inputs, 6)
    mmsink.wrap(model, kv={"window": 4, "sinks": 1})
    with mmsink.disabled(model):
        off = greedy(model, inputs, 6)
    assert type(off.past_key_values).__name__ == "DynamicCache"
    assert torch.equal(off.sequences, ref.sequences)
    mmsink.unwrap(model)
    out = greedy(model, inputs, 6)
    assert type(out.past_key_values).__name__ == "DynamicCache"
    assert torch.equal(out.sequences, ref.sequences)
    assert all(not m._forward_pre_hooks for m in model.model.language_model.layers)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
