"""generate_fast with the sink + window KV cache (issue 17; ``mmsink.kv.fast``): the same tokens as
``generate`` with the same ``kv=`` mode, evicting at every decode step on fixed-size buffers."""

from __future__ import annotations

import pytest
import torch
from test_selection_syncs import SyncOps
from tiny import (
    batch,
    fast_and_generate,
    greedy,
    massive_llava,
    module_model,
    next_batch,
    prompt,
    prompts_with,
    qwen_batch,
    replay_stand_in,
    tiny_llava_next,
    tiny_qwen,
)

import mmsink
from mmsink.fast import decode as fastmod
from mmsink.kv import fast as kvfast

CHANNEL, TOKEN, DECODED = 5, 7, 76  # a massive channel on token 7 (mid-prompt) and on a token decoded often


# two tokens carry a massive activation: one in the prompts, one the model generates (so decode steps
# flag sinks too)
model, unwrapped = module_model(lambda: massive_llava((TOKEN, DECODED), CHANNEL))
AUTO = {"sinks": "auto", "first": 2, "sink_dims": [CHANNEL], "tau": 5.0, "sink_layer": 1}


def prompts():
    """Left-padded batch of two (45 and 57 tokens), token 7 in the middle of the second."""
    return batch(prompts_with(TOKEN))


def plain_fast(model, inputs, n):
    with torch.no_grad():
        return mmsink.generate_fast(model, max_new_tokens=n, compile=False, **inputs)


@pytest.mark.parametrize(
    "kv",
    [
        {"window": 8, "sinks": 4},  # both samples evict from the prefill on
        {"window": 50, "sinks": 4},  # the shorter sample starts evicting during decode
        {"window": 8, **AUTO},
        {"window": 50, **AUTO},
    ],
)
@pytest.mark.parametrize("prune", [{}, {"prune": "fastv", "budget": 6}])
def test_same_tokens_as_generate_with_the_window(model, kv, prune):
    inputs = prompts()
    n = 24
    fast, ref = fast_and_generate(model, inputs, n=n, kv=kv, **prune)
    assert torch.equal(fast, ref)
    mmsink.wrap(model, kv=kv, **prune)
    cache = greedy(model, inputs, n, output_scores=False).past_key_values
    mmsink.unwrap(model)
    length = inputs["input_ids"].shape[1]
    kept = cache.kept_origins()
    assert all(k[-1] == length + n - 2 for k in kept)  # the last fed token: decode ran ...
    assert all(
        len(k) < inputs["attention_mask"][b].sum() + n - 1 for b, k in enumerate(kept)
    )  # ... and evicted
    if kv["sinks"] == "auto":  # sinks flagged in the prompt (and, with window 8, during decode: token 76)
        flagged = cache.origin[cache.sink]
        assert (flagged < length).any() and (kv["window"] != 8 or (flagged >= length).any())
    if kv["window"] == 8:  # the window changes the answer: the comparison sees the eviction
        assert not torch.equal(fast, plain_fast(model, inputs, n))


def test_a_window_covering_everything_equals_the_plain_fast_path(model):
    inputs = prompts()
    ref = plain_fast(model, inputs, 16)
    mmsink.wrap(model, kv={"window": 10_000, "sinks": 4})
    assert torch.equal(plain_fast(model, inputs, 16), ref)


def test_replayed_step_and_a_reused_decoder(model, monkeypatch):
    """The graphed path on CPU: capture replaced by a stand-in (one warm-up step, replay = the step), so
    ``fill`` must undo the warm-up; a second call of the same shapes reuses the decoder."""
    captured = []

    monkeypatch.setattr(fastmod, "capture_graph", replay_stand_in(captured))
    kv = {"window": 8, "sinks": 4}
    mmsink.wrap(model, kv=kv)
    for seed in (0, 1):
        inputs = batch([prompt(3, 5, seed=1 + seed), prompt(9, 11, seed=3 + seed)], seed=seed)
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            out = mmsink.generate_fast(model, max_new_tokens=12, graphs=True, compile=False, **inputs)
        assert torch.equal(out, ref)
    assert len(captured) == 1


def test_the_step_never_reads_the_device(model, monkeypatch):
    """The step (layers, argmax, eviction) is one CUDA graph on a GPU: no value read, no host-built tensor
    inside it (counted on CPU as test_selection_syncs does), for sinks 4 and "auto", pruned or not."""
    seen, steps = SyncOps(), []
    plain = kvfast.WindowDecoder.step

    def counted(dec):
        steps.append(1)
        with seen:
            plain(dec)

    monkeypatch.setattr(kvfast.WindowDecoder, "step", counted)
    for kv, prune in (
        ({"window": 8, "sinks": 4}, {}),
        ({"window": 8, **AUTO}, {"prune": "fastv", "budget": 6}),
    ):
        mmsink.wrap(model, kv=kv, **prune)
        plain_fast(model, prompts(), 8)
        mmsink.unwrap(model)
    assert len(steps) == 14 and not seen.seen


def test_full_buffers_are_refused(model, monkeypatch):
    """More decode tokens flagged as sinks than the buffers' spare slots: a clear error, not other tokens."""
    monkeypatch.setattr(kvfast, "SPARE_SINKS", 0)
    monkeypatch.setattr(kvfast, "ROUND", 1)  # buffers exactly as large as the sizes say
    mmsink.wrap(model, kv={"window": 8, **AUTO})
    with pytest.raises(ValueError, match="buffers filled up"):
        plain_fast(model, prompts(), 24)


@pytest.mark.parametrize("kv", [{"quant": "int8"}, {"sparse": "lfps", "topk": 8}])
def test_the_other_kv_modes_run(model, kv):
    """quant and LFPS run too (tested in tests/test_kv_fast_quant.py and tests/test_kv_fast_sparse.py)."""
    mmsink.wrap(model, kv=kv)
    assert plain_fast(model, prompts(), 4).shape[1] > prompts()["input_ids"].shape[1]


@pytest.mark.parametrize("kv,mode", [({"window": 8, "sinks": 4}, "window"), ({"quant": "int4"}, "quant")])
def test_step_options_are_refused_with_the_window(model, kv, mode):
    mmsink.wrap(model, kv=kv)
    with pytest.raises(ValueError, match=f"step= options do not apply to the kv {mode} mode"):
        with torch.no_grad():
            mmsink.generate_fast(model, max_new_tokens=4, compile=False, step={"fuse": True}, **prompts())


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_mrope(kind):
    """3-D positions: a batch with images of different sizes and a text-only sample, prompts longer than
    the window, so the cache re-assigns M-RoPE positions by runs during decode."""
    qwen = tiny_qwen(kind, layers=2)
    inputs, _ = qwen_batch([(4, 6, [(8, 12)]), (2, 3, [(4, 8)]), (3, 5, [])], seed=1)
    fast, ref = fast_and_generate(qwen, inputs, n=16, kv={"window": 10, "sinks": 2})
    assert torch.equal(fast, ref)
    assert not torch.equal(fast, plain_fast(qwen, inputs, 16))


def test_llava_next_with_fastv():
    """LLaVA-NeXT (anyres tiles of two image sizes), pruned, window past the prompts."""
    next_model = tiny_llava_next(layers=4)
    inputs, _ = next_batch(next_model, [(3, 4, [(28, 56)]), (2, 5, [(56, 56)])], seed=1)
    fast, ref = fast_and_generate(
        next_model, inputs, n=16, kv={"window": 12, "sinks": 4}, prune="fastv", budget=6
    )
    assert torch.equal(fast, ref)
    mmsink.wrap(next_model, prune="fastv", budget=6)
    assert not torch.equal(fast, plain_fast(next_model, inputs, 16))
