"""generate_fast with LFPS sparse decoding (issue 17; ``mmsink.kv.fast_sparse``): the same tokens and the
same chosen slots as ``generate`` with the same ``kv=`` config, on a fixed-shape step."""

from __future__ import annotations

import pytest
import torch
from test_selection_syncs import SyncOps
from tiny import (
    batch,
    check_fast_batched_equals_alone,
    fast,
    fast_and_generate,
    module_model,
    prompt,
    qwen_batch,
    replay_stand_in,
    tiny_llava,
    tiny_qwen,
    two_prompts,
)

import mmsink
from mmsink.api import get_handle
from mmsink.fast import decode as fastmod
from mmsink.kv import fast_sparse
from mmsink.kv.sparse import SparseCache

model, unwrapped = module_model(lambda: tiny_llava(layers=3))


def chosen(hist):
    """Per sample and head, the set of chosen slots of a history [B, H, k] (-1: none)."""
    return [[set(s[s >= 0].tolist()) for s in row] for row in hist]


def fast_choices(model, inputs, n, monkeypatch):
    """generate_fast's tokens and each layer step's history, in call order (steps x layers)."""
    seen, plain = [], fast_sparse.sparse_layer_step

    def recorded(*args):
        out = plain(*args)
        seen.append(chosen(args[8]))  # the history the step wrote
        return out

    monkeypatch.setattr(fast_sparse, "sparse_layer_step", recorded)
    out = fast(model, inputs, n)
    monkeypatch.setattr(fast_sparse, "sparse_layer_step", plain)
    return out, seen


def generate_choices(model, inputs, n):
    """generate's tokens and its cache's history after each layer's decode attention (call order)."""
    cache = SparseCache(get_handle(model).kv, model.model.language_model.rotary_emb.inv_freq)
    cache.trace = []
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, past_key_values=cache)
    return out, [chosen(slots) for _, _, _, slots in cache.trace]


@pytest.mark.parametrize(
    "kv",
    [
        {"sparse": "lfps", "topk": 1000, "dense_steps": 1},  # (a) top-k covers the context: dense
        {"sparse": "lfps", "topk": 6},  # (b) both samples attend sparsely
        {"sparse": "lfps", "topk": 50, "expand": 0, "dense_steps": 1},  # sample 0 short until 51 keys
        {"sparse": "lfps", "topk": 7, "sinks": 2},  # each sample's first 2 real slots always chosen
        {"sparse": "lfps", "topk": 50, "expand": 0, "dense_steps": 1, "sinks": 3},
    ],
)
def test_same_tokens_and_choices_as_generate(model, kv, monkeypatch):
    inputs = batch(two_prompts())
    n = 12
    mmsink.wrap(model, kv=kv)
    out, got = fast_choices(model, inputs, n, monkeypatch)
    ref, want = generate_choices(model, inputs, n)
    assert torch.equal(out, ref)
    assert got == want[: len(got)] and len(got) == len(want)  # every layer step chose the same slots
    mmsink.unwrap(model)
    dense = fast(model, inputs, n)
    if kv["topk"] >= out.shape[1]:  # (a): == plain generate_fast
        assert torch.equal(out, dense)
    elif kv["topk"] == 6:  # (b): the selection drops keys and that changes the answer
        layers = len(model.model.language_model.layers)
        last = got[-layers:]  # the last step: 6 of more than 60 keys per head
        assert all(len(s) == 6 for per_layer in last for row in per_layer for s in row)
        assert not torch.equal(out, dense)


@pytest.mark.parametrize("sinks", [0, 3])
def test_batched_equals_per_sample(model, sinks):
    """(c) A left-padded batch of two == each sample alone (its own buffers, no padding)."""
    ps = two_prompts()
    mmsink.wrap(model, kv={"sparse": "lfps", "topk": 10, "sinks": sinks})
    n = 12
    check_fast_batched_equals_alone(model, ps, n)


def test_after_a_pruned_prefill(model):
    """(d) FastV, then LFPS (per-layer segments: pruned layers choose among their own slots)."""
    inputs = batch(two_prompts())
    out, ref = fast_and_generate(
        model, inputs, n=12, prune="fastv", budget=4, kv={"sparse": "lfps", "topk": 9}
    )
    assert torch.equal(out, ref)
    mmsink.wrap(model, prune="fastv", budget=4)
    assert not torch.equal(out, fast(model, inputs, 12))


def test_qwen_mrope():
    """(e) Qwen2-VL's 3-D positions (images of two sizes and a text-only sample)."""
    qwen = tiny_qwen(layers=2)
    inputs, _ = qwen_batch([(4, 6, [(8, 12)]), (3, 5, [])], seed=1)
    out, ref = fast_and_generate(qwen, inputs, n=10, kv={"sparse": "lfps", "topk": 6})
    assert torch.equal(out, ref)
    assert not torch.equal(out, fast(qwen, inputs, 10))


@pytest.mark.parametrize("sinks", [0, 2])
def test_replayed_steps_reused_decoder_and_no_device_reads(model, monkeypatch, sinks):
    """The graphed path on CPU: capture replaced by a stand-in (warm-up step, replay = the step), two
    variants (dense, sparse) captured once, ``fill`` undoing the warm-ups; a second call of the same shapes
    reuses the decoder; the step reads nothing from the device (counted as test_selection_syncs does)."""
    captured, ops = [], SyncOps()

    monkeypatch.setattr(fastmod, "capture_graph", replay_stand_in(captured, ops))
    mmsink.wrap(model, kv={"sparse": "lfps", "topk": 8, "sinks": sinks})
    for seed in (0, 1):
        inputs = batch([prompt(3, 5, seed=1 + seed), prompt(9, 11, seed=3 + seed)], seed=seed)
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(fast(model, inputs, 8, graphs=True), ref)
    assert len(captured) == 2 and not ops.seen
