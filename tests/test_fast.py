"""generate_fast (static per-layer KV buffers, one fixed-shape decode step) gives exactly the tokens of
greedy ``generate`` for every pruner's plan, left-padded batches, the bare model and LLaVA-NeXT; what it
does not implement is refused."""

import contextlib
import shutil
import types

import pytest
import torch
import torch.nn.functional as F
from test_var import VAR
from tiny import (
    batch,
    fill_cache_alive_at_run,
    next_batch,
    prompt,
    qwen_batch,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen,
)

import mmsink
from mmsink.fast import clear as fast_clear
from mmsink.fast import decode as fastmod
from mmsink.fast import fuse

CASES = [
    (None, {}),
    ("none", {}),
    ("fastv", {"budget": 6}),
    ("pdrop", {}),
    ("dart", {"budget": 8}),
    ("random", {"budget": 9}),
    ("visipruner", {"budget": 5}),
    ("visipruner", {"budget": 5, "layer_threshold": 0.9999, "mask_until_fallback": True}),  # early, masked
    ("visipruner", {}),
    ("fastv", {"budget": 6, "sink_forward": {"factor": 1.01, "max_sinks": 3}}),
]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.mark.parametrize("method,opts", CASES)
def test_same_tokens_as_generate(llava, method, opts):
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(3, 9, seed=3)])
    mmsink.wrap(llava, prune=method, **opts)
    try:
        ref = llava.generate(**inputs, max_new_tokens=10, do_sample=False)
        kept = mmsink.stats(llava).kept_tokens
        out = mmsink.generate_fast(llava, max_new_tokens=10, **inputs)
        assert mmsink.stats(llava).kept_tokens == kept  # the same plan
    finally:
        mmsink.unwrap(llava)
    assert torch.equal(out, ref)


def test_dart_skips_the_rotation_where_positions_start_at_zero(llava, monkeypatch):
    """generate_fast's positions start at 0 on each sample, so DART's key norms need no rotation undone
    (``dart.local_l1`` skips it there): a left-padded batch keeps the tokens of the model's own forward
    without position ids, whose keys the padding rotated and DART rotates back."""
    from mmsink.pruners import dart

    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(3, 9, seed=3)])
    real, undone = dart.local_l1, []

    def watched(k, valid, pe, rope):
        undone.append(pe is not None)
        return real(k, valid, pe, rope)

    monkeypatch.setattr(dart, "local_l1", watched)
    mmsink.wrap(llava, prune="dart", budget=8)
    try:
        with torch.no_grad():
            llava(**inputs)
        want = mmsink.stats(llava).kept_indices
        mmsink.generate_fast(llava, max_new_tokens=1, **inputs)
        got = mmsink.stats(llava).kept_indices
    finally:
        mmsink.unwrap(llava)
    assert undone == [True, False]
    assert got == want


def test_bare_model_and_eos_padding(llava):
    inputs = batch([prompt(5, 7, seed=4), prompt(2, 4, seed=5)])
    ref = llava.generate(**inputs, max_new_tokens=12, do_sample=False)
    out = mmsink.generate_fast(llava, max_new_tokens=12, **inputs)
    assert torch.equal(out, ref)
    # make one sample stop early: its first generated token becomes the end-of-sequence id
    first = ref[0, inputs["input_ids"].shape[1] + 2].item()
    llava.generation_config.eos_token_id = first
    try:
        ref = llava.generate(**inputs, max_new_tokens=12, do_sample=False)
        out = mmsink.generate_fast(llava, max_new_tokens=12, **inputs)
    finally:
        llava.generation_config.eos_token_id = None
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method,opts", [(None, {}), ("pdrop", {})])
def test_prefill_cache_is_freed_before_decoding(llava, monkeypatch, method, opts):
    """The decoder's buffers hold a copy of the prefill's keys / values once filled, so the prefill's cache
    (the whole prompt's for a bare model, the layers before the hand-off when wrapped) is gone while the
    tokens are decoded; the tokens stay generate's."""
    alive = fill_cache_alive_at_run(monkeypatch, fastmod.FastDecoder)
    inputs = batch([prompt(5, 7, seed=6), prompt(2, 4, seed=7)])
    if method:
        mmsink.wrap(llava, prune=method, **opts)
    try:
        ref = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
        out = mmsink.generate_fast(llava, max_new_tokens=6, **inputs)
    finally:
        if method:
            mmsink.unwrap(llava)
    assert torch.equal(out, ref)
    assert alive == [False]


def test_unpruned_prefill_leaves_no_cache_beside_the_buffers(llava, monkeypatch):
    """``prune="none"`` and the bare model (through a handle of the call) hand off before the first layer:
    the decoder is filled from a cache holding no keys (its layers wrote into the buffers), so the prompt's
    KV is not carried twice at the fill; same tokens."""
    held = []
    real_fill = fastmod.FastDecoder.fill

    def fill(self, cache, *a, **k):
        keys = [getattr(layer, "keys", None) for layer in cache.layers]
        held.append(sum(k.numel() for k in keys if k is not None))
        return real_fill(self, cache, *a, **k)

    monkeypatch.setattr(fastmod.FastDecoder, "fill", fill)
    inputs = batch([prompt(5, 7, seed=8), prompt(2, 4, seed=9)])
    ref = llava.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(mmsink.generate_fast(llava, max_new_tokens=5, **inputs), ref)
    mmsink.wrap(llava, prune="none")
    try:
        assert torch.equal(mmsink.generate_fast(llava, max_new_tokens=5, **inputs), ref)
    finally:
        mmsink.unwrap(llava)
    assert held == [0, 0], held


def test_bare_model_runs_every_layer_in_the_tail_and_is_left_as_it_was(llava, monkeypatch):
    """An unwrapped model's prompt runs as under ``wrap(prune="none")``: no decoder layer's own forward runs
    (every layer in the decoder's tail, one graph on a GPU: the forward stops at the first layer),
    generate's tokens; after the call, and after a
    call that fails inside, the model has no handle, no hooks and its own attention entry."""
    inputs = batch([prompt(5, 7, seed=10), prompt(2, 4, seed=11)])
    ref = llava.generate(**inputs, max_new_tokens=5, do_sample=False)
    layers = llava.model.language_model.layers
    mods = list(llava.modules())

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)

    def state():  # (generate_fast's kept decoders and graphs aside: "_mmsink_..." entries)
        own = {k for k in llava.__dict__ if not k.startswith("_mmsink_")}
        return hooks(), llava.config.text_config._attn_implementation, own

    before = state()
    assert mmsink.core.hooks.ATTR not in before[2]
    ran = []  # layers called through the model's forward (their hooks run); the tail calls them bare
    counts = [m.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, m in enumerate(layers)]
    try:
        out = mmsink.generate_fast(llava, max_new_tokens=5, **inputs)
    finally:
        for c in counts:
            c.remove()
    assert torch.equal(out, ref) and ran == [0], ran  # handed off at the first layer's pre-hook
    assert state() == before

    def broken(*a, **k):
        raise RuntimeError("inside")

    monkeypatch.setattr(fastmod.FastDecoder, "run_tail", broken)
    with pytest.raises(RuntimeError, match="inside"):
        mmsink.generate_fast(llava, max_new_tokens=5, **inputs)
    assert state() == before
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not wrapped"):
        mmsink.stats(llava)
    fast_clear(llava)


def test_llava_next():
    model = tiny_llava_next()
    inputs, _ = next_batch(model, [(3, 4, [(28, 56)]), (2, 5, [(56, 56)])], seed=1)
    mmsink.wrap(model, prune="fastv", budget=6)
    ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    out = mmsink.generate_fast(model, max_new_tokens=8, **inputs)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method,opts", [(None, {}), ("fastv", {"budget": 6}), ("visipruner", {})])
def test_var_decode(llava, monkeypatch, method, opts):
    """VAR in the decode step (its groups from the prefill's key codes, new tokens never sinks): the
    tokens of generate with VAR, for a left-padded batch. A step that attended plainly instead would not
    give them (checked where VAR's decode-time edit changes this model's tokens)."""
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    mmsink.wrap(llava, prune=method, var=VAR, **opts)
    try:
        ref = llava.generate(**inputs, max_new_tokens=10, do_sample=False)
        out = mmsink.generate_fast(llava, max_new_tokens=10, **inputs)
        if method is None:
            plain = lambda q, k, v, valid, codes, scale, cfg, fns: F.scaled_dot_product_attention(  # noqa: E731
                q, k, v, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=q.shape[1] != k.shape[1]
            )
            monkeypatch.setattr(fastmod, "decode_attention", plain)
            fast_clear(llava)
            assert not torch.equal(mmsink.generate_fast(llava, max_new_tokens=10, **inputs), ref)
    finally:
        mmsink.unwrap(llava)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize(
    "method,opts", [(None, {}), ("fastv", {"budget": 4}), ("visionzip", {"budget": 0.5})]
)
@pytest.mark.parametrize("fused", [False, True])
def test_qwen_mrope(kind, method, opts, fused, monkeypatch):
    """3-D positions: the decode step continues from the prefill's rope deltas (images of different
    sizes and a text-only sample in one left-padded batch); ``fused``: the prefill tail through
    ``layer_prefill`` (compile=True's step, run here without the compiler)."""
    if fused:
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = tiny_qwen(kind)
    inputs, _ = qwen_batch([(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)]), (3, 5, [])], seed=1)
    mmsink.wrap(model, prune=method, **opts)
    ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    out = mmsink.generate_fast(model, max_new_tokens=8, compile=fused, graphs=False, **inputs)
    assert torch.equal(out, ref)


def test_decoder_reused_across_calls(llava):
    """The second prompt of a similar length reuses the first call's buffers (and, on GPU, its graph):
    every piece of per-call state is reset, so it still gives generate's tokens; a new stop id or a
    longer prompt gets its own decoder; unwrap drops them."""
    mmsink.wrap(llava, prune="fastv", budget=6)
    try:
        for seed in (1, 3, 5):
            inputs = batch([prompt(5, 7, seed=seed), prompt(2, 4 + seed % 2, seed=seed + 1)])
            ref = llava.generate(**inputs, max_new_tokens=10, do_sample=False)
            assert torch.equal(mmsink.generate_fast(llava, max_new_tokens=10, **inputs), ref)
        assert len(llava._mmsink_decoders) == 1
        first = ref[0, inputs["input_ids"].shape[1] + 3].item()
        llava.generation_config.eos_token_id = first  # a stop id mid-way: a second decoder
        try:
            ref = llava.generate(**inputs, max_new_tokens=10, do_sample=False)
            assert torch.equal(mmsink.generate_fast(llava, max_new_tokens=10, **inputs), ref)
        finally:
            llava.generation_config.eos_token_id = None
        assert len(llava._mmsink_decoders) == 2
        long = batch([prompt(5, 7 + fastmod.ROUND, seed=9)])
        ref = llava.generate(**long, max_new_tokens=6, do_sample=False)
        assert torch.equal(mmsink.generate_fast(llava, max_new_tokens=6, **long), ref)
        assert len(llava._mmsink_decoders) == 3
    finally:
        mmsink.unwrap(llava)
    assert not hasattr(llava, "_mmsink_decoders")


NO_CXX = shutil.which("c++") is None and shutil.which("g++") is None


@pytest.mark.slow  # inductor's CPU compile; the compiled steps' arithmetic: test_fused_prefill_tail_step,
# tests/test_fast_var.py (the eager backend's guards), the GPU tests (graphs + compile)
@pytest.mark.skipif(NO_CXX, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_layer_step(llava):
    """``compile=True``: the layer step through torch.compile (dynamic shapes: one compiled step for
    layers of different cache lengths) gives generate's tokens, also for a second prompt."""
    mmsink.wrap(llava, prune="pdrop")
    try:
        for seed in (1, 2):
            inputs = batch([prompt(5, 7, seed=seed), prompt(2, 4, seed=seed + 2)])
            ref = llava.generate(**inputs, max_new_tokens=8, do_sample=False)
            out = mmsink.generate_fast(llava, max_new_tokens=8, compile=True, **inputs)
            assert torch.equal(out, ref)
    finally:
        mmsink.unwrap(llava)


@pytest.mark.parametrize(
    "method,opts,hands_off",
    [
        ("fastv", {"budget": 6}, True),
        ("pdrop", {}, True),
        ("random", {"budget": 9}, True),
        ("none", {}, True),
        ("visipruner", {"budget": 5}, True),  # settles once every sample has fused
        ("visipruner", {"budget": 5, "fallback_layer": 7}, False),  # decides at the last layer
    ],
)
def test_prefill_hands_off_where_the_plan_is_final(llava, monkeypatch, method, opts, hands_off):
    """Pruners whose last decision layer is known stop the model's forward there and run the remaining
    layers in generate_fast (one graph on GPU); VisiPruner stops once it has decided for every sample.
    Either way the stats are the ones generate's prefill gives."""
    calls = []
    real = fastmod.FastDecoder.tail
    monkeypatch.setattr(fastmod.FastDecoder, "tail", lambda self, *a: calls.append(a[0]) or real(self, *a))
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    mmsink.wrap(llava, prune=method, **opts)
    try:
        ref = llava.generate(**inputs, max_new_tokens=5, do_sample=False)
        want = mmsink.stats(llava)
        out = mmsink.generate_fast(llava, max_new_tokens=5, **inputs)
        got = mmsink.stats(llava)
    finally:
        mmsink.unwrap(llava)
    assert torch.equal(out, ref)
    assert bool(calls) == hands_off
    assert got.kept_indices == want.kept_indices and got.prefill_flops == want.prefill_flops
    if calls:  # the plan no longer changes from the hand-off layer on
        assert all(k == want.kept_indices[calls[0]] for k in want.kept_indices[calls[0] :])


def test_placement_is_walked_again_when_weights_move():
    """generate_fast keeps the weights' devices on the model (a full walk per call costs ms on a 7B
    model); moving a layer afterwards (here: to meta, as an offloading dispatch does) is seen next call."""
    model = tiny_llava(layers=4)
    inputs = batch([prompt(3, 4, seed=1)])
    mmsink.generate_fast(model, max_new_tokens=2, **inputs)
    assert fastmod.placement(model)[0] == {torch.device("cpu")}
    model.model.language_model.layers[2].to("meta")
    with pytest.raises(ValueError, match="needs every weight in memory"):
        mmsink.generate_fast(model, max_new_tokens=2, **inputs)


@pytest.mark.parametrize("method,opts", [("pdrop", {}), ("fastv", {"budget": 6}), ("none", {})])
@pytest.mark.parametrize("padded,fused", [(True, False), (False, False), (True, True)])
def test_fused_prefill_tail_step(llava, monkeypatch, method, opts, padded, fused):
    """With ``compile=True`` the layers after the hand-off run ``layer_prefill`` (the model's modules in one
    fused step) instead of the model's layer forwards. Run here without the compiler (same arithmetic):
    generate's tokens, for a padded batch (boolean mask) and a single prompt (plain causal); ``fused``:
    with the fused decode step, whose joint q / k / v and gate / up tensors the tail's GEMMs use too."""
    calls = []
    real = fastmod.layer_prefill
    monkeypatch.setattr(fastmod, "layer_prefill", lambda *a: calls.append(sorted(a[-1] or ())) or real(*a))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    prompts = [prompt(5, 7, seed=1), prompt(2, 4, seed=2)] if padded else [prompt(5, 7, seed=1)]
    inputs = batch(prompts)
    mmsink.wrap(llava, prune=method, **opts)
    try:
        ref = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
        step = {"fuse": True} if fused else None
        out = mmsink.generate_fast(llava, max_new_tokens=6, compile=True, graphs=False, step=step, **inputs)
    finally:
        mmsink.unwrap(llava)
    assert calls  # the fused step ran
    assert all(j == (["gu", "qkv"] if fused else []) for j in calls), calls
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("padded", [False, True])
def test_layer_prefill_equals_the_models_layer(family, padded):
    """One decoder layer: ``layer_prefill`` gives the model's own layer output and writes the keys and
    values the model's layer hands its cache (fp32, tight tolerance)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_llava(layers=2) if family == "llava" else tiny_qwen("qwen2_vl", layers=2)
    lm = model.model.language_model
    layer, cfg = lm.layers[1], lm.config
    b, n = 2, 11
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b, n, cfg.hidden_size, generator=g)
    pos = torch.arange(n)[None].expand(b, -1)
    if family != "llava":
        pos = pos[None].expand(3, -1, -1) + torch.tensor([0, 1, 2])[:, None, None]
    cos, sin = lm.rotary_emb(h, pos)
    mask = None
    if padded:
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[1, :3] = False
        mask = mmsink.core.attention.allowed_matrix(valid, n)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    kb, vb = torch.zeros(b, kv, n + 4, d), torch.zeros(b, kv, n + 4, d)
    got = fastmod.layer_prefill(layer, h, cos, sin, kb, vb, mask, heads, kv, apply_rotary_pos_emb)
    # the fused step's joint tensors (q / k / v, gate / up): one GEMM each, the same outputs
    kj, vj = torch.zeros_like(kb), torch.zeros_like(vb)
    joint = fuse.fused(model, lm.layers)[1]
    assert set(joint) == {"qkv", "gu"}
    joined = fastmod.layer_prefill(
        layer, h, cos, sin, kj, vj, mask, heads, kv, apply_rotary_pos_emb, None, joint
    )
    torch.testing.assert_close(joined, got, atol=1e-6, rtol=1e-6)
    assert torch.equal(kj, kb) and torch.equal(vj, vb)  # (a different GEMM would not give them exactly)
    dec = types.SimpleNamespace(k={1: torch.zeros_like(kb)}, v={1: torch.zeros_like(vb)})
    with torch.no_grad():
        want = layer(
            h, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=fastmod.StaticKV(dec, n)
        )
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kb, dec.k[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vb, dec.v[1], atol=1e-6, rtol=1e-6)


def test_graph_bookkeeping_with_a_replay_stand_in(llava, monkeypatch):
    """The graphed path on CPU: capture replaced by a stand-in whose replay re-runs the captured function
    on the captured (static) inputs and copies into the captured outputs, as a CUDA graph replay does.
    generate's tokens for two prompts of one shape and one of another; a tail shape is captured the
    second time it comes, then replayed; the decode step is captured once per decoder."""
    captured = []

    def stand_in(fn):
        out = fn()
        captured.append(fn)

        def replay():
            new = fn()
            if isinstance(out, torch.Tensor):
                out.copy_(new)

        return out, replay

    monkeypatch.setattr(fastmod, "capture_graph", stand_in)
    mmsink.wrap(llava, prune="fastv", budget=6)
    fast_clear(llava)
    try:
        runs = [
            batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)], seed=0),
            batch([prompt(5, 7, seed=3), prompt(2, 4, seed=4)], seed=1),  # same shapes, other values
            batch([prompt(5, 7, seed=6), prompt(2, 4, seed=7)], seed=2),
            batch([prompt(3, 9, seed=5)], seed=3),  # another shape
        ]
        counts = []
        for inputs in runs:
            ref = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
            out = mmsink.generate_fast(llava, max_new_tokens=6, graphs=True, compile=False, **inputs)
            assert torch.equal(out, ref)
            decs = llava.__dict__[fastmod.STORE].values()
            counts.append((len(captured), sum(len(d.tails) for d in decs)))
    finally:
        mmsink.unwrap(llava)
    # call 1: decode step captured, tail eager; call 2: tail captured; call 3: replays only;
    # call 4: a new decoder (other shapes): its decode step captured, its tail eager
    assert counts == [(1, 0), (2, 1), (2, 1), (3, 1)]


@pytest.mark.parametrize("method,opts", [("none", {}), ("fastv", dict(budget=6))])
def test_decode_step_in_stages_with_a_replay_stand_in(llava, monkeypatch, method, opts):
    """A model split over GPUs decodes with one graph per device: the step cut into stages whose
    carried tensors are copied into the next stage's static inputs. On CPU the cut is forced (embedding
    and two layers | the other layers and the head | bookkeeping) and capture is a stand-in that replays
    by re-running on the static inputs and copying into the static outputs: generate's tokens."""

    def stand_in(fn):
        out = fn()

        def replay():
            new = fn()
            for o, n in zip(
                out if isinstance(out, tuple) else (out,), new if isinstance(new, tuple) else (new,)
            ):
                o.copy_(n)

        return out, replay

    def three(self):
        n, cpu = len(self.layers), self.tok.device
        return [
            (cpu, [("start",), ("layers", 0, 2)]),
            (cpu, [("layers", 2, n), ("pick",)]),
            (cpu, [("book",)]),
        ]

    monkeypatch.setattr(fastmod, "capture_graph", stand_in)
    monkeypatch.setattr(fastmod.FastDecoder, "stages", three)
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)], seed=0)
    mmsink.wrap(llava, prune=method, **opts)
    fast_clear(llava)
    try:
        ref = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
        for _ in range(2):  # captured, then replayed
            out = mmsink.generate_fast(llava, max_new_tokens=6, graphs=True, compile=False, **inputs)
            assert torch.equal(out, ref)
        (dec,) = llava.__dict__[fastmod.STORE].values()
        assert dec.graph is None and [len(s[1] or ()) for s in dec.staged] == [0, 4, 1]
    finally:
        mmsink.unwrap(llava)
        fast_clear(llava)


def test_stages_plain_calls_equal_the_step(llava):
    """The same cut as plain calls (graphs=False): every stage's ops after the one before give the step."""
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)], seed=0)
    ref = llava.generate(**inputs, max_new_tokens=5, do_sample=False)
    orig = fastmod.FastDecoder.run

    def run(self, steps):
        n, cpu = len(self.layers), self.tok.device
        self.capture_stages(
            [(cpu, [("start",), ("layers", 0, 1)]), (cpu, [("layers", 1, n), ("pick",), ("book",)])],
            graphs=False,
        )
        return orig(self, steps)

    fast_clear(llava)
    try:
        fastmod.FastDecoder.run = run
        out = mmsink.generate_fast(llava, max_new_tokens=5, graphs=False, compile=False, **inputs)
    finally:
        fastmod.FastDecoder.run = orig
        fast_clear(llava)
    assert torch.equal(out, ref)
