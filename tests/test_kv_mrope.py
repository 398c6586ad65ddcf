"""The sink + window cache on Qwen2-VL's 3-D M-RoPE positions (issue 17): positions re-assigned by runs
(``mmsink.kv.window.compact``), checked against plain Python models of the rule and of the stream."""

from __future__ import annotations

import torch
from tiny import batch_ids, greedy, module_model, qwen_batch, tiny_qwen
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

import mmsink
from mmsink.kv import WindowCache
from mmsink.kv.window import compact

SPECS = [(3, 5, [(4, 4)]), (6, 9, [(4, 8)])]


model, unwrapped = module_model(lambda: tiny_qwen(layers=2))


def compact_reference(pos, cols):
    """Plain loops: runs of consecutive columns shift as one (all axes); each run starts one past the
    largest coordinate of the runs before it; the first at 0."""
    out, top, shift = [], -1, 0
    for i, (p, c) in enumerate(zip(pos, cols, strict=True)):
        if i == 0 or c != cols[i - 1] + 1:
            shift = top + 1 - min(p)
        q = [x + shift for x in p]
        out.append(q)
        top = max(top, *q)
    return out


def test_compact_equals_the_plain_rule():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 12, (1,), generator=g))
        cols = sorted(torch.randperm(30, generator=g)[:n].tolist())
        pos = torch.randint(0, 40, (n, 3), generator=g).tolist()
        pad = int(torch.randint(0, 3, (1,), generator=g))
        p = torch.tensor([[0, 0, 0]] * pad + pos)[None]
        c = torch.tensor([-1] * pad + cols)[None]
        v = c >= 0
        got = compact(p, c, v)[0, pad:].tolist()
        assert got == compact_reference(pos, cols)
    # 1-D positions: the rule is the rank
    p = torch.tensor([[5, 6, 7, 40, 41, 90]])[..., None]
    assert compact(p, torch.tensor([[0, 1, 2, 9, 10, 44]]), torch.ones(1, 6, dtype=torch.bool))[
        0, :, 0
    ].tolist() == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]


def plain_positions(model, inputs, n):
    """The 3-D positions the unwrapped model gives every column (prompt and decode steps)."""
    seen = []
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"][-3:]), with_kwargs=True)
    try:
        greedy(model, inputs, n)
    finally:
        h.remove()
    return torch.cat(seen, 2).permute(1, 2, 0)  # [B, columns, 3]


def stream_reference(mask_row, plain, n_new, first, window):
    """Plain model of the stream: per forward append its real columns (positions: the plain model's
    until the first eviction, then one past the largest kept), keep first + window, re-assign by runs."""
    length = len(mask_row)
    forwards = [[c for c in range(length) if mask_row[c]]] + [[length + j] for j in range(n_new - 1)]
    kept, compacted = [], False  # (column, [t, h, w])
    for cols in forwards:
        for c in cols:
            nxt = max(max(p) for _, p in kept) + 1 if kept else 0
            kept.append((c, [nxt] * 3 if compacted else plain[c].tolist()))
        if len(kept) > first + window:
            kept = kept[:first] + kept[-window:]
            pos = compact_reference([p for _, p in kept], [c for c, _ in kept])
            kept = [(c, p) for (c, _), p in zip(kept, pos, strict=True)]
            compacted = True
    return kept


def test_window_covering_everything_equals_plain_cache(model):
    inputs, _ = qwen_batch(SPECS)
    ref = greedy(model, inputs, 10)
    mmsink.wrap(model, kv={"window": 10_000})
    out = greedy(model, inputs, 10)
    assert isinstance(out.past_key_values, WindowCache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_positions_and_rerotated_keys_equal_fresh_ones(model):
    """Kept columns and their 3-D positions == the plain stream model; every layer's keys == the raw keys
    rotated afresh (the model's own M-RoPE) at those positions."""
    inputs, _ = qwen_batch(SPECS)
    n, first, window = 14, 7, 9  # sample 0's sinks hold two image tokens
    plain = plain_positions(model, inputs, n)
    lm = model.model.language_model
    raw = {i: [] for i in range(len(lm.layers))}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: raw[i].append(o.detach()))
        for i, layer in enumerate(lm.layers)
    ]
    try:
        mmsink.wrap(model, kv={"window": window, "sinks": first})
        cache = greedy(model, inputs, n).past_key_values
    finally:
        for h in hooks:
            h.remove()
    assert cache.compacted
    text = model.config.text_config
    heads, dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    for b, row in enumerate(inputs["attention_mask"].tolist()):
        want = stream_reference(row, plain[b], n, first, window)
        valid = cache.valid[b]
        assert cache.origin[b][valid].tolist() == [c for c, _ in want]
        assert cache.pos[b][valid].tolist() == [p for _, p in want]
        assert b or any(len(set(p)) > 1 for _, p in want[:first])  # image tokens: 3-D positions
        pos = cache.pos[b][valid].T[:, None]  # [3, 1, K]
        for i, layer in enumerate(cache.layers):
            k = torch.cat(raw[i], 1)[b, cache.origin[b][valid]].view(1, -1, heads, dim).transpose(1, 2)
            cos, sin = lm.rotary_emb(k, pos)
            fresh, _ = apply_rotary_pos_emb(k, k, cos, sin)
            torch.testing.assert_close(layer.keys[b][:, valid], fresh[0], rtol=1e-5, atol=1e-5)


def one_of(inputs, prompts, i):
    """Sample i of a ``qwen_batch`` alone (its own ids, patches, grid)."""
    one = batch_ids([prompts[i]])
    grids = inputs["image_grid_thw"]  # one image per sample in SPECS
    start = sum(int(grids[j].prod()) for j in range(i))
    rows = int(grids[i].prod())
    one["pixel_values"] = inputs["pixel_values"][start : start + rows]
    one["image_grid_thw"] = grids[i : i + 1]
    one["mm_token_type_ids"] = inputs["mm_token_type_ids"][i : i + 1, -len(prompts[i]) :]
    return one


def test_batched_equals_per_sample_with_eviction(model):
    inputs, prompts = qwen_batch(SPECS)
    mmsink.wrap(model, kv={"window": 8, "sinks": 2})
    out = greedy(model, inputs, 12)
    assert out.past_key_values.compacted
    width = inputs["input_ids"].shape[1]
    for i, p in enumerate(prompts):
        alone = greedy(model, one_of(inputs, prompts, i), 12)
        assert torch.equal(out.sequences[i, width:], alone.sequences[0, len(p) :])
        for a, b in zip(out.scores, alone.scores, strict=True):
            torch.testing.assert_close(a[i], b[0], rtol=1e-4, atol=1e-4)
