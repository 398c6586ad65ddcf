"""generate_fast with VAR hands the prefill off where the plan is final (before layer 0 without a pruner,
after FastV's layer K with it) and runs the remaining layers on the decoder's buffers, VAR's edit and key
codes included: generate's tokens for a left-padded batch, through the model's layer forwards, the fused
tail step (``compile=True``), a graphed tail (capture stood in on the CPU) and prefill_batch chunks; the
stats equal generate's prefill's."""

import shutil

import pytest
import torch
from test_var import VAR
from tiny import batch, next_batch, prompt, qwen_batch, tiny_llava, tiny_llava_next, tiny_qwen

import mmsink
from mmsink.core.hooks import get_handle
from mmsink.fast import clear as fast_clear
from mmsink.fast import decode as fastmod
from mmsink.sinks import var as var_mod

LAYERS = 8
VAR_LAYERS = list(range(2, LAYERS - 1))  # 2 .. L-2
# FastV's budget 9 on these prompts: VAR changes generate's tokens (see test_the_tails_edit_matters)
CASES = [(None, {}, 0), ("none", {}, 0), ("fastv", {"budget": 9}, 2)]


def prompts3(seed: int = 1):
    return [prompt(5, 7, seed=seed), prompt(2, 4, seed=seed + 1), prompt(3, 9, seed=seed + 2)]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def llava(request):
    return tiny_llava(layers=LAYERS, attn=request.param)


def count_tails(monkeypatch) -> list:
    """Patches ``FastDecoder.tail``: the list gets the first layer of every tail run."""
    calls = []
    real = fastmod.FastDecoder.tail
    monkeypatch.setattr(fastmod.FastDecoder, "tail", lambda self, *a: calls.append(a[0]) or real(self, *a))
    return calls


def fast_and_reference(model, inputs, method, opts, n: int = 10, **kw):
    """(generate's tokens, its prefill's stats, generate_fast's tokens, its stats) under VAR + ``method``."""
    mmsink.wrap(model, prune=method, var=VAR, **opts)
    fast_clear(model)
    try:
        ref = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        want = mmsink.stats(model)
        out = mmsink.generate_fast(model, max_new_tokens=n, **inputs, **kw)
        got = mmsink.stats(model)
    finally:
        mmsink.unwrap(model)
    return ref, want, out, got


@pytest.mark.parametrize("method,opts,first", CASES)
def test_var_hands_off_and_gives_generates_tokens(llava, monkeypatch, method, opts, first):
    """The hand-off happens with VAR (the old code ran every layer in the model's forward: no tail), the
    tail's layers are the model's own forwards with VAR's edit as their directive; generate's tokens and
    its prefill's stats (kept tokens, FLOPs with VAR's edits, VAR's sink counts per layer)."""
    calls = count_tails(monkeypatch)
    ref, want, out, got = fast_and_reference(llava, batch(prompts3()), method, opts, compile=False)
    assert calls == [first]
    assert torch.equal(out, ref)
    assert sorted(got.extra["var_sinks"]) == VAR_LAYERS
    assert got == want


@pytest.mark.parametrize(
    "method,opts,first",
    [
        ("pdrop", {}, 6),  # VAR's codes of layers 2-5 (three segments) from the cache, 6 from the tail
        ("visionzip", {"budget": 8}, 0),
        ("dart", {"budget": 8}, 2),
        ("visipruner", {"budget": 5}, 5),  # settles once every sample has fused
    ],
)
def test_other_pruners_with_var(monkeypatch, method, opts, first):
    calls = count_tails(monkeypatch)
    model = tiny_llava(layers=LAYERS)
    ref, want, out, got = fast_and_reference(model, batch(prompts3()), method, opts, compile=False)
    assert calls == [first]
    assert torch.equal(out, ref)
    assert got == want


def test_the_tails_edit_matters(monkeypatch):
    """Without VAR's edit and codes in the tail, generate_fast's tokens are not generate's (alone and with
    FastV at these settings): the tests above compare something VAR changes."""
    model = tiny_llava(layers=LAYERS)
    monkeypatch.setattr(fastmod.FastDecoder, "var_edit", lambda self, *a: None)
    for method, opts, _ in (CASES[0], CASES[2]):
        ref, _, out, _ = fast_and_reference(model, batch(prompts3()), method, opts, compile=False)
        assert not torch.equal(out, ref), method


@pytest.mark.parametrize("method,opts,first", CASES)
def test_fused_tail_with_var(monkeypatch, method, opts, first):
    """``compile=True``'s tail: every layer one ``layer_prefill`` step, a VAR layer's with its key codes
    and edit in it (``var.layer_attention``: compiled with the layer, no call of VAR's own compiled
    functions); torch.compile stands in (hands back the function): generate's tokens and stats."""
    model = tiny_llava(layers=LAYERS)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    edits, compiled = [], []
    real = fastmod.layer_prefill
    monkeypatch.setattr(fastmod, "layer_prefill", lambda *a: edits.append(a[10] is not None) or real(*a))
    call = var_mod.Compiled.__call__
    monkeypatch.setattr(
        var_mod.Compiled, "__call__", lambda self, *a: compiled.append(self.fn.__name__) or call(self, *a)
    )
    inputs = batch(prompts3())
    mmsink.wrap(model, prune=method, var={**VAR, "compile": True}, **opts)
    fast_clear(model)
    try:
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        want = mmsink.stats(model)
        compiled.clear()
        out = mmsink.generate_fast(model, max_new_tokens=8, compile=True, graphs=False, **inputs)
        got = mmsink.stats(model)
    finally:
        mmsink.unwrap(model)
    tail_var = [i for i in VAR_LAYERS if i >= first]
    assert edits == [i in tail_var for i in range(first, LAYERS)]
    before = [i for i in VAR_LAYERS if i < first]  # (VAR's own compiled call in the model's layers)
    assert [c for c in compiled if c == "prefill_edit"] == ["prefill_edit"] * len(before)
    assert torch.equal(out, ref)
    assert got == want


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on CPU needs C++"
)
# slow (MMSINK_SLOW=1 runs it): CI's path compiles the tail's steps with the real compiler in test_fast.py
# (no VAR) and VAR's work in test_var_compile.py; the recompile-limit test below traces these same steps
@pytest.mark.slow
@pytest.mark.parametrize("method,opts,first", [CASES[0], CASES[2]])
def test_compiled_tail_with_var(monkeypatch, method, opts, first):
    """The real compiler (CUDA's defaults forced on the CPU): the tail's layers through the compiled
    ``layer_prefill``, VAR's edit traced into it, twice (the second call reuses what the first compiled);
    generate's prefill with VAR's compiled ``prefill_edit`` (none fell back): generate's tokens."""
    calls = count_tails(monkeypatch)
    model = tiny_llava(layers=LAYERS)
    inputs = batch(prompts3())
    mmsink.wrap(model, prune=method, var={**VAR, "compile": True}, **opts)
    fast_clear(model)
    try:
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        for _ in range(2):
            out = mmsink.generate_fast(model, max_new_tokens=8, compile=True, graphs=False, **inputs)
            assert torch.equal(out, ref)
        fn = get_handle(model).var_compiled.prefill_edit
        assert fn.compiled is not None and not fn.failed
    finally:
        mmsink.unwrap(model)
    assert calls == [first, first]


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
@pytest.mark.parametrize("method,opts", [(None, {}), ("fastv", {"budget": 4})])
def test_other_families_with_var(monkeypatch, family, method, opts):
    """LLaVA-NeXT (tiles) and Qwen2-VL (M-RoPE, a text-only row in the batch): the hand-off with VAR gives
    generate's tokens and stats."""
    calls = count_tails(monkeypatch)
    if family == "llava_next":
        model = tiny_llava_next(layers=LAYERS)
        inputs, _ = next_batch(model, [(3, 4, [(28, 56)]), (2, 5, [(56, 56)])], seed=1)
    else:
        model = tiny_qwen(family, layers=LAYERS)
        inputs, _ = qwen_batch([(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)]), (3, 5, [])], seed=1)
    ref, want, out, got = fast_and_reference(model, inputs, method, opts, n=8, compile=False, graphs=False)
    assert calls == [0 if method is None else 2]
    assert torch.equal(out, ref)
    assert got == want


def stand_in(fn):
    """A CUDA graph's capture on the CPU: the replay re-runs ``fn`` on the captured (static) inputs and
    copies into the captured outputs."""
    out = fn()

    def replay():
        new = fn()
        if isinstance(out, torch.Tensor):
            out.copy_(new)

    return out, replay


@pytest.mark.parametrize("method,opts,first", CASES)
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_tail_with_var(monkeypatch, method, opts, first, compile):
    """The tail as a graph (captured the second time its shapes come, then replayed): VAR's plan tensors
    are static inputs loaded per call, so a batch of the same shapes whose rows hold their image at other
    places (its visual slots, prompt slots and edited rows differ) replays with its own; generate's tokens
    every time. ``compile``: the fused tail step (torch.compile stood in)."""
    monkeypatch.setattr(fastmod, "capture_graph", stand_in)
    if compile:
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = tiny_llava(layers=LAYERS)
    runs = [
        batch([prompt(5, 7, seed=1), prompt(7, 5, seed=2)], seed=0),
        batch([prompt(5, 7, seed=3), prompt(7, 5, seed=4)], seed=1),  # captured
        batch([prompt(7, 5, seed=5), prompt(5, 7, seed=6)], seed=2),  # replayed, images elsewhere
        batch([prompt(5, 7, seed=7), prompt(7, 5, seed=8)], seed=3),  # replayed
    ]
    mmsink.wrap(model, prune=method, var=VAR, **opts)
    fast_clear(model)
    try:
        tails = []
        for inputs in runs:
            ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            want = mmsink.stats(model)
            out = mmsink.generate_fast(model, max_new_tokens=8, graphs=True, compile=compile, **inputs)
            assert torch.equal(out, ref)
            assert mmsink.stats(model) == want
            (dec,) = model.__dict__[fastmod.STORE].values()
            tails.append(len(dec.tails))
    finally:
        mmsink.unwrap(model)
    assert tails == [0, 1, 1, 1]


@pytest.mark.parametrize("method,opts,first", CASES)
def test_prefill_batch_with_var(monkeypatch, method, opts, first):
    """prefill_batch chunks of 1 and 2 rows: each chunk's tail writes its rows (keys, values, VAR's codes)
    of the one decoder; generate's tokens."""
    calls = count_tails(monkeypatch)
    model = tiny_llava(layers=LAYERS)
    inputs = batch(prompts3() + [prompt(4, 6, seed=9)])
    mmsink.wrap(model, prune=method, var=VAR, **opts)
    fast_clear(model)
    try:
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        for size in (2, 1):
            calls.clear()
            out = mmsink.generate_fast(model, max_new_tokens=8, compile=False, prefill_batch=size, **inputs)
            assert torch.equal(out, ref), size
            assert calls == [first] * (4 // size)
    finally:
        mmsink.unwrap(model)


def test_prefill_batch_first_chunk_without_an_image():
    """A first chunk without an image runs untouched (its decoder keeps no VAR codes); a later chunk that
    needs them is a one-line error, not tokens decoded without VAR."""
    model = tiny_llava(layers=LAYERS)
    inputs = batch([prompt(3, 4, seed=1, images=0), prompt(5, 7, seed=2)])
    mmsink.wrap(model, var=VAR)
    try:
        with pytest.raises(ValueError, match="rows 1-1 need VAR's codes in layers"):
            mmsink.generate_fast(model, max_new_tokens=4, compile=False, prefill_batch=1, **inputs)
    finally:
        mmsink.unwrap(model)


@pytest.mark.parametrize("method,opts", [(None, {}), ("fastv", {"budget": 9})])
def test_var_handoff_off_runs_the_whole_forward(llava, monkeypatch, method, opts):
    """``var_handoff=False`` (the A/B switch): no tail, every layer in the
    model's forward as before the hand-off existed; generate's tokens and stats all the same."""
    calls = count_tails(monkeypatch)
    ref, want, out, got = fast_and_reference(
        llava, batch(prompts3()), method, opts, compile=False, var_handoff=False
    )
    assert calls == []
    assert torch.equal(out, ref)
    assert got == want


def test_var_compile_false_keeps_the_tails_var_layers_eager(monkeypatch):
    """``VARConfig(compile=False)`` under ``generate_fast(compile=True)``: the tail runs the model's own
    layer forwards (no ``layer_prefill`` step, into which VAR's edit would be compiled); generate's
    tokens and stats."""
    model = tiny_llava(layers=LAYERS)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    steps = []
    real = fastmod.layer_prefill
    monkeypatch.setattr(fastmod, "layer_prefill", lambda *a: steps.append(1) or real(*a))
    inputs = batch(prompts3())
    mmsink.wrap(model, prune="fastv", budget=9, var={**VAR, "compile": False})
    fast_clear(model)
    try:
        ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        want = mmsink.stats(model)
        out = mmsink.generate_fast(model, max_new_tokens=10, compile=True, graphs=False, **inputs)
        got = mmsink.stats(model)
    finally:
        mmsink.unwrap(model)
    assert steps == []
    assert torch.equal(out, ref)
    assert got == want


def test_tail_steps_stay_under_the_recompile_limit(monkeypatch):
    """Dynamo keeps at most ``recompile_limit`` (8) compiled entries per code object, then runs it eagerly.
    One model's tail through a whole batch and chunks of 2 and 1 rows (guards: VAR or not, padding mask or
    not, batch 1): the plain and the VAR layers' steps compile as separate code objects, each well under
    the limit (the old single step reached it). torch.compile's eager backend: the real guards, no
    codegen."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": "eager"}))
    torch._dynamo.reset()
    model = tiny_llava(layers=LAYERS)
    model.generation_config.eos_token_id = None
    inputs = batch(prompts3())
    mmsink.wrap(model, prune="fastv", var={**VAR, "compile": True}, budget=9)
    fast_clear(model)
    try:
        ref = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        for size in (None, 2, 1):
            out = mmsink.generate_fast(
                model,
                max_new_tokens=2,
                compile=True,
                graphs=False,
                prefill_batch=size,
                var_handoff=True,
                **inputs,
            )
            assert torch.equal(out, ref), size
        limit = torch._dynamo.config.recompile_limit
        counts = {
            f.__name__: len(_debug_get_cache_entry_list(f.__code__))
            for f in (fastmod.layer_prefill, fastmod.var_layer_prefill)
        }
    finally:
        mmsink.unwrap(model)
        torch._dynamo.reset()
    assert all(0 < c <= limit // 2 for c in counts.values()), counts
