"""LFPS sparse decoding (issue 17): ``wrap(model, kv={"sparse": "lfps", "topk": k})``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny import (
    batch,
    check_batched_equals_alone,
    greedy,
    module_model,
    qwen_batch,
    tiny_llava,
    tiny_qwen,
    two_prompts,
)

import mmsink
from mmsink.api import get_handle
from mmsink.kv.sparse import ExactTopkCache, PlanSparseCache, SparseCache
from mmsink.kv.sparse import step as lfps_step

model, unwrapped = module_model(lambda: tiny_llava(layers=3))


def run(model, inputs, n, cache=None, **gen):
    return greedy(model, inputs, n, past_key_values=cache, **gen)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_topk_covering_the_context_equals_dense(model, family):
    if family == "qwen":
        model = tiny_qwen(layers=2)
        inputs, _ = qwen_batch([(3, 5, [(4, 4)]), (6, 9, [(4, 8)])])
    else:
        inputs = batch(two_prompts())
    ref = run(model, inputs, 10)
    mmsink.wrap(model, kv={"sparse": "lfps", "topk": 1000, "dense_steps": 1})
    out = run(model, inputs, 10)
    assert isinstance(out.past_key_values, SparseCache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    mmsink.unwrap(model)


def reference_choice(q, keys, valid, prev, topk, expand, dense, scale, sinks=0):
    """Plain loops over samples and heads: the rule of mmsink.kv.sparse, from scratch. ``sinks``: each
    sample's first ``sinks`` real slots are candidates and always chosen, the rest is the rule's top."""
    b, h, _ = q.shape
    hk, t = keys.shape[1], keys.shape[2]
    out = []
    for i in range(b):
        real = [j for j in range(t) if valid[i, j]]
        kept = set(real[:sinks])
        rows = []
        for head in range(h):
            k = keys[i, head // (h // hk)]
            if dense or prev is None or len(real) <= topk:
                cand = real
            else:
                near = {p + o for p in prev[i][head] for o in range(-expand, expand + 2)} | {t - 1}
                cand = [j for j in sorted(near | kept) if 0 <= j < t and valid[i, j]]
            score = {j: float(q[i, head] @ k[j]) * scale for j in cand}
            rest = [j for j in cand if j not in kept]
            rows.append(kept | set(sorted(rest, key=lambda j: -score[j])[: topk - len(kept)]))
        out.append(rows)
    return out


@pytest.mark.parametrize("topk,expand,dense_steps", [(8, 1, 2), (50, 0, 1), (12, 2, 3)])
def test_chosen_slots_equal_a_plain_reference_of_the_rule(model, topk, expand, dense_steps):
    """topk 50: sample 0 (45 tokens) attends densely until it holds 51 keys, sample 1 sparsely: both
    paths of ``select`` run in one batch."""
    inputs = batch(two_prompts())
    mmsink.wrap(model, kv={"sparse": "lfps", "topk": topk, "expand": expand, "dense_steps": dense_steps})
    cache = SparseCache(get_handle(model).kv, model.model.language_model.rotary_emb.inv_freq)
    cache.trace = []
    run(model, inputs, 12, cache=cache)
    scale = model.config.text_config.head_dim**-0.5
    prev: dict = {}
    width = inputs["input_ids"].shape[1]
    sparse_seen = False
    for n, (layer, q, keys, slots) in enumerate(cache.trace):
        step = n // len(model.model.language_model.layers)
        valid = torch.cat([inputs["attention_mask"].bool(), torch.ones(2, step + 1, dtype=torch.bool)], 1)
        assert keys.shape[2] == width + step + 1
        want = reference_choice(q, keys, valid, prev.get(layer), topk, expand, step < dense_steps, scale)
        got = [[set(s[s >= 0].tolist()) for s in row] for row in slots]
        assert got == want
        sparse_seen |= step >= dense_steps and any(len(r) < int(v.sum()) for r, v in zip(want[1], valid))
        prev[layer] = [[sorted(s) for s in row] for row in want]
    assert sparse_seen


def test_exact_topk_oracle_chooses_the_true_top_k(model):
    """ExactTopkCache (the oracle of evals/kv_stream): every step's choice == the plain-loop top-k over all
    real keys; LFPS's history-based choice misses it on some sparse step (the rule is not exact)."""
    inputs = batch(two_prompts())
    topk, layers = 6, len(model.model.language_model.layers)
    mmsink.wrap(model, kv={"sparse": "lfps", "topk": topk, "dense_steps": 1})
    scale = model.config.text_config.head_dim**-0.5
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    misses = {}
    for kind in (ExactTopkCache, SparseCache):
        cache = kind(get_handle(model).kv, inv_freq)
        cache.trace = []
        run(model, inputs, 10, cache=cache)
        misses[kind] = 0
        for n, (_, q, keys, slots) in enumerate(cache.trace):
            step = n // layers
            valid = torch.cat([inputs["attention_mask"].bool(), torch.ones(2, step + 1, dtype=torch.bool)], 1)
            exact = reference_choice(q, keys, valid, None, topk, 0, True, scale)
            misses[kind] += [[set(s[s >= 0].tolist()) for s in row] for row in slots] != exact
    assert misses[ExactTopkCache] == 0 and misses[SparseCache] > 0


@pytest.mark.parametrize("beams", [1, 2])
def test_batched_equals_per_sample(model, beams):
    mmsink.wrap(model, kv={"sparse": "lfps", "topk": 10})
    check_batched_equals_alone(model, 12, beams)


def test_sparse_differs_from_dense_when_it_must(model):
    """A small top-k changes the logits (the sparse path runs), within the dense steps it does not."""
    inputs = batch(two_prompts())
    ref = run(model, inputs, 6)
    mmsink.wrap(model, kv={"sparse": "lfps", "topk": 4, "dense_steps": 2})
    out = run(model, inputs, 6)
    for j, (a, b) in enumerate(zip(out.scores, ref.scores, strict=True)):
        if j < 3:  # the prompt's forward and the two dense steps
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert not torch.allclose(a, b, atol=1e-3)


def test_after_a_pruned_prefill(model):
    """FastV, then LFPS: top-k covering the context == the pruned plain cache; each layer chooses among
    its own slots (a pruned layer's == the plain-loop rule on its slots); batched == per sample."""
    inputs = batch(two_prompts())
    mmsink.wrap(model, prune="fastv", budget=4)
    ref = run(model, inputs, 8)
    mmsink.wrap(model, prune="fastv", budget=4, kv={"sparse": "lfps", "topk": 1000, "dense_steps": 1})
    out = run(model, inputs, 8)
    assert isinstance(out.past_key_values, PlanSparseCache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    mmsink.wrap(model, prune="fastv", budget=4, kv={"sparse": "lfps", "topk": 9})
    out = check_batched_equals_alone(model, 10)  # the batch of two_prompts(), as inputs
    cache_trace(model, inputs, out.past_key_values)


def cache_trace(model, inputs, done):
    """Rerun with a trace and check a pruned layer's choices against the plain rule on its slots."""
    cfg, seen = done.cfg, []

    def start_trace(module, args, kwargs, output):  # after the prefill: record the decode steps
        cache = kwargs["past_key_values"]
        if cache.trace is None:
            cache.trace = []
            seen.append(cache)

    h = model.register_forward_hook(start_trace, with_kwargs=True)
    try:
        run(model, inputs, 10)
    finally:
        h.remove()
    cache = seen[0]
    scale = model.config.text_config.head_dim**-0.5
    prev: dict = {}
    layers = len(model.model.language_model.layers)
    pruned = [
        i for i in range(layers) if cache.segment_valid[cache.layer_segment[i]].shape[1] < done.valid.shape[1]
    ]
    assert pruned
    for n, (layer, q, keys, slots) in enumerate(cache.trace):
        step = n // layers
        valid = cache.key_valid(layer)[:, : keys.shape[2]]
        want = reference_choice(
            q, keys, valid, prev.get(layer), cfg.topk, cfg.expand, step < cfg.dense_steps, scale
        )
        assert [[set(s[s >= 0].tolist()) for s in row] for row in slots] == want
        prev[layer] = [[sorted(s) for s in row] for row in want]


def test_refused(model):
    with pytest.raises(ValueError, match="sparse does not combine with window"):
        mmsink.wrap(model, kv={"sparse": "lfps", "window": 8})


def test_grow_layer_holds_what_a_dynamic_layer_holds():
    """LFPS's cache layer writes into spare slots instead of concatenating: after prompts, steps past a
    buffer's end, a beam reorder and keys set from outside, it holds exactly what DynamicLayer holds."""
    from transformers.cache_utils import DynamicLayer

    from mmsink.kv.sparse import GrowLayer

    g = torch.Generator().manual_seed(0)
    grow, plain = GrowLayer(), DynamicLayer()

    def step(q):
        k, v = torch.randn(2, 3, q, 4, generator=g), torch.randn(2, 3, q, 4, generator=g)
        a, b = grow.update(k, v), plain.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    step(5)
    for _ in range(300):  # past the first buffer's 256 spare slots
        step(1)
    grow.reorder_cache(torch.tensor([1, 1]))
    plain.reorder_cache(torch.tensor([1, 1]))
    step(1)
    step(7)
    k, v = plain.keys[:, :, ::2].clone(), plain.values[:, :, ::2].clone()  # as a pruner sets them
    grow.keys, grow.values, plain.keys, plain.values = k, v, k.clone(), v.clone()
    step(1)
    assert grow.keys.shape == plain.keys.shape


def test_sink_kept_while_chosen_then_out_of_reach_once_dropped():
    """Issue 17: the candidates come from the previous step's choice only, so slot 0 (the sink) stays while
    each query picks it (vertical pattern) and, once one query drops it and slot 1, no later step can
    reach it (nothing lies left of it), however high its score; the exact top-k still picks it. Every
    step also equals the plain reference of the rule."""
    torch.manual_seed(0)
    t, d, topk, expand = 40, 4, 4, 1
    keys = torch.randn(1, 1, t, d) * 0.1
    keys[0, 0, 0] = torch.tensor([10.0, -10.0, 0, 0])  # the sink: A attends it, B avoids it
    keys[0, 0, 1] = torch.tensor([0.0, -10.0, 0, 0])  # its only neighbour that could bring it back
    values = torch.randn(1, 1, t, d)
    valid = torch.ones(1, t, dtype=torch.bool)
    qa, qb = torch.tensor([[[1.0, 0, 0, 0]]]), torch.tensor([[[0, 1.0, 0, 0]]])
    cfg = SimpleNamespace(topk=topk, expand=expand, dense_steps=1)
    hist, chose = None, []
    for n, q in enumerate((qa, qa, qb, qa)):
        dense = n == 0
        _, nxt = lfps_step(q, keys, values, valid, hist, cfg, dense, 1.0, True)
        prev = None if hist is None else [[sorted(s[s >= 0].tolist()) for s in hist[0]]]
        want = reference_choice(q, keys, valid, prev, topk, expand, dense, 1.0)
        got = set(nxt[0, 0][nxt[0, 0] >= 0].tolist())
        assert [[got]] == want
        chose.append(got)
        hist = nxt
    assert 0 in chose[0] and 0 in chose[1]  # seeded by the dense step, kept while A picks it
    assert 0 not in chose[2] and 1 not in chose[2]  # B drops it
    assert 0 not in chose[3]  # A again: out of reach
    _, exact = lfps_step(qa, keys, values, valid, hist, cfg, False, 1.0, True, exact=True)
    assert int(exact[0, 0, 0]) == 0  # the exact top-k ranks it first


def trace_of(model, inputs, n, kv):
    mmsink.wrap(model, kv=kv)
    cache = SparseCache(get_handle(model).kv, model.model.language_model.rotary_emb.inv_freq)
    cache.trace = []
    out = run(model, inputs, n, cache=cache)
    return out, cache.trace


def test_sinks_zero_is_the_rule_bitwise(model):
    """sinks 0 (the default with sparse; window modes keep 4) == the rule: the same tokens, logits and
    chosen slots (tensors, in order) as without the option, and those equal the plain reference."""
    from mmsink.kv.config import make_config

    assert make_config({"sparse": "lfps"}).sinks == 0 and make_config({"window": 8}).sinks == 4
    inputs = batch(two_prompts())
    kv = {"sparse": "lfps", "topk": 8}
    a, ta = trace_of(model, inputs, 10, kv)
    b, tb = trace_of(model, inputs, 10, dict(kv, sinks=0))
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))
    assert len(ta) == len(tb) and all(torch.equal(x[3], y[3]) for x, y in zip(ta, tb))
    c, _ = trace_of(model, inputs, 10, dict(kv, sinks=2))
    assert not torch.equal(a.sequences, c.sequences) or not all(
        torch.equal(x, y) for x, y in zip(a.scores, c.scores)
    )


@pytest.mark.parametrize("topk,expand,dense_steps,sinks", [(8, 1, 2, 3), (50, 0, 1, 2), (6, 2, 1, 1)])
def test_sinks_always_chosen_the_rest_follows_the_rule(model, topk, expand, dense_steps, sinks):
    """kv sinks N: at every step, layer and head each sample's first N real slots (after its left padding)
    are chosen, the other choices == the plain reference of the rule with those slots added. topk 50: the
    masked path (sample 0 short) and the candidate-only path both run."""
    inputs = batch(two_prompts())
    kv = {"sparse": "lfps", "topk": topk, "expand": expand, "dense_steps": dense_steps, "sinks": sinks}
    _, trace = trace_of(model, inputs, 12, kv)
    scale = model.config.text_config.head_dim**-0.5
    layers = len(model.model.language_model.layers)
    pad = (1 - inputs["attention_mask"]).sum(1).tolist()
    prev: dict = {}
    for n, (layer, q, keys, slots) in enumerate(trace):
        step = n // layers
        valid = torch.cat([inputs["attention_mask"].bool(), torch.ones(2, step + 1, dtype=torch.bool)], 1)
        dense = step < dense_steps
        want = reference_choice(q, keys, valid, prev.get(layer), topk, expand, dense, scale, sinks)
        got = [[set(s[s >= 0].tolist()) for s in row] for row in slots]
        assert got == want
        for i, row in enumerate(got):
            assert all(set(range(pad[i], pad[i] + sinks)) <= s for s in row)
        prev[layer] = [[sorted(s) for s in row] for row in want]


def test_sinks_bring_back_the_dropped_sink():
    """The case of test_sink_kept_while_chosen_then_out_of_reach_once_dropped with sinks 1: slot 0 is
    chosen at every step (the query that avoids it included); the other choices follow the rule."""
    torch.manual_seed(0)
    t, d, topk, expand = 40, 4, 4, 1
    keys = torch.randn(1, 1, t, d) * 0.1
    keys[0, 0, 0] = torch.tensor([10.0, -10.0, 0, 0])
    keys[0, 0, 1] = torch.tensor([0.0, -10.0, 0, 0])
    values = torch.randn(1, 1, t, d)
    valid = torch.ones(1, t, dtype=torch.bool)
    qa, qb = torch.tensor([[[1.0, 0, 0, 0]]]), torch.tensor([[[0, 1.0, 0, 0]]])
    cfg = SimpleNamespace(topk=topk, expand=expand, dense_steps=1, sinks=1)
    hist = None
    for n, q in enumerate((qa, qa, qb, qa)):
        dense = n == 0
        for long in (True, False):  # the candidate-only and the masked path
            _, nxt = lfps_step(q, keys, values, valid, hist, cfg, dense, 1.0, long)
            prev = None if hist is None else [[sorted(s[s >= 0].tolist()) for s in hist[0]]]
            want = reference_choice(q, keys, valid, prev, topk, expand, dense, 1.0, sinks=1)
            got = set(nxt[0, 0][nxt[0, 0] >= 0].tolist())
            assert [[got]] == want and 0 in got
        hist = nxt


@pytest.mark.parametrize("beams", [1, 2])
def test_sinks_batched_equals_per_sample(model, beams):
    mmsink.wrap(model, kv={"sparse": "lfps", "topk": 10, "sinks": 3})
    check_batched_equals_alone(model, 12, beams)


@pytest.mark.parametrize("sinks", [-1, 8, 9, "auto", True, 1.5, "4"])
def test_sinks_refused(model, sinks):
    with pytest.raises(ValueError, match="kv sparse sinks must be an int in 0 .. topk - 1"):
        mmsink.wrap(model, kv={"sparse": "lfps", "topk": 8, "sinks": sinks})
