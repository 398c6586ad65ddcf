"""``generate_fast(prefill_batch=N)``: a left-padded batch prefilled in row chunks of at most N, each
chunk's keys / values loaded into its rows of one decoder, gives the tokens of the whole batch prefilled
at once (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL; hand-off and whole-forward prefills, VAR, the fused step, the
graphed decode step); each chunk's prefill cache is gone before the next chunk's; what it cannot
represent or split is a one-line error."""

import gc
import weakref

import pytest
import torch
from test_var import VAR
from tiny import IMAGE_TOKEN, batch, next_batch, prompt, qwen_batch, tiny_llava, tiny_llava_next, tiny_qwen

import mmsink
from mmsink.fast import clear as fast_clear
from mmsink.fast import decode as fastmod
from mmsink.fast import store

CHUNKS = (1, 2)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


def prompts5():
    """Five prompts of different lengths: one with two images, one without an image."""
    return [
        prompt(5, 7, seed=1),
        prompt(2, 4, seed=2),
        prompt(3, 9, seed=3, images=2),
        prompt(1, 2, seed=4, images=0),
        prompt(6, 11, seed=5),
    ]


def chunked_equals_whole(model, inputs, n: int = 8, chunks=CHUNKS, **kw):
    """generate_fast with each ``prefill_batch`` in ``chunks`` gives the whole-batch prefill's tokens."""
    whole = mmsink.generate_fast(model, max_new_tokens=n, compile=False, **inputs, **kw)
    assert whole.shape[1] > inputs["input_ids"].shape[1] + 1
    for size in chunks:
        out = mmsink.generate_fast(model, max_new_tokens=n, compile=False, prefill_batch=size, **inputs, **kw)
        assert torch.equal(out, whole), size


LLAVA_CASES = [
    (None, {}),  # the whole forward, its cache copied in
    ("none", {}),  # hands off before the first layer
    ("fastv", {"budget": 6}),
    ("visionzip", {"budget": 8}),
    ("dart", {"budget": 8}),
    ("visipruner", {"budget": 5}),
    (None, {"var": VAR}),  # no hand-off: VAR's key codes loaded by rows
]
# (a text-only chunk runs untouched by the wrap, as a text-only batch does: without VAR's prefill edits)
VAR_PROMPTS = [prompt(4, 3, seed=6), prompt(2, 8, seed=7), prompt(5, 5, seed=8)]


@pytest.mark.parametrize("method,opts", LLAVA_CASES)
def test_llava_chunks_give_the_whole_batch_tokens(llava, method, opts):
    inputs = batch(prompts5()[:3] + VAR_PROMPTS if "var" in opts else prompts5())
    mmsink.wrap(llava, prune=method, **opts)
    try:
        chunked_equals_whole(llava, inputs)
    finally:
        mmsink.unwrap(llava)


def test_chunks_of_the_fused_step(llava):
    """``step=`` (fused projections, one KV write: every slot after the prompt valid once written) on a
    decoder loaded chunk by chunk."""
    mmsink.wrap(llava, prune="fastv", budget=6)
    try:
        chunked_equals_whole(llava, batch(prompts5()), chunks=(2,), step={"fuse": True, "write": True})
    finally:
        mmsink.unwrap(llava)


@pytest.mark.parametrize("method", ["none", "fastv"])
def test_chunks_of_the_fused_prefill_tail(llava, monkeypatch, method):
    """``compile=True``'s tail (``layer_prefill``, run here without the compiler) writes a chunk's rows."""
    calls = []
    real = fastmod.layer_prefill
    monkeypatch.setattr(fastmod, "layer_prefill", lambda *a: calls.append(a[4].shape[0]) or real(*a))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    inputs = batch(prompts5()[:3] + VAR_PROMPTS)
    mmsink.wrap(llava, prune=method, budget=6 if method == "fastv" else None)
    fast_clear(llava)
    try:
        whole = mmsink.generate_fast(llava, max_new_tokens=6, compile=True, graphs=False, **inputs)
        out = mmsink.generate_fast(
            llava, max_new_tokens=6, compile=True, graphs=False, prefill_batch=4, **inputs
        )
    finally:
        mmsink.unwrap(llava)
    assert torch.equal(out, whole)
    assert set(calls) == {6, 4, 2}  # the whole batch's rows, then the chunks'


@pytest.mark.parametrize("method,opts", [(None, {}), ("fastv", {"budget": 6}), ("visionzip", {"budget": 8})])
def test_llava_next_chunks(method, opts):
    model = tiny_llava_next()
    specs = [(3, 4, [(28, 56)]), (2, 5, [(56, 56)]), (4, 2, []), (1, 6, [(56, 28), (28, 56)])]
    inputs, _ = next_batch(model, specs, seed=1)
    mmsink.wrap(model, prune=method, **opts)
    chunked_equals_whole(model, inputs)


@pytest.mark.parametrize(
    "method,opts", [(None, {}), ("fastv", {"budget": 4}), ("visionzip", {"budget": 0.5})]
)
def test_qwen_chunks(method, opts):
    """Qwen's pixel rows are packed image by image (sliced by each chunk's images and their grids); the
    decode continues from each row's rope delta, which its own chunk's prefill computed."""
    model = tiny_qwen("qwen2_vl")
    specs = [(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)]), (3, 5, []), (1, 2, [(4, 4)])]
    inputs, _ = qwen_batch(specs, seed=1)
    mmsink.wrap(model, prune=method, **opts)
    chunked_equals_whole(model, inputs, graphs=False)


def cache_bytes(cache) -> int:
    layers = [(getattr(x, "keys", None), getattr(x, "values", None)) for x in cache.layers]
    return sum(t.numel() * t.element_size() for kv in layers for t in kv if t is not None)


def bytes_alive_at_loads(monkeypatch) -> list:
    """Patches ``FastDecoder.load``: the returned list gets, per load, the bytes of keys / values of every
    prefill cache loaded so far that is still alive (after a garbage collection)."""
    refs, alive = [], []
    real = fastmod.FastDecoder.load

    def load(self, cache, *a, **k):
        refs.append(weakref.ref(cache))
        gc.collect()
        alive.append(sum(cache_bytes(c) for c in (r() for r in refs) if c is not None))
        return real(self, cache, *a, **k)

    monkeypatch.setattr(fastmod.FastDecoder, "load", load)
    return alive


@pytest.mark.parametrize("method,opts", [(None, {}), ("fastv", {"budget": 6})])
def test_one_chunks_cache_alive_at_a_time(llava, monkeypatch, method, opts):
    """At every load only the loading chunk's prefill cache is alive (the earlier chunks' are gone): the
    bare model's (every layer) and FastV's (the layers before its hand-off) hold each row's full prompt,
    so chunks of 2 of 5 rows hold 2/5 of the whole batch's bytes at most; a chunk's cache kept until the
    decode would hold 4/5, then all of it. Same tokens."""
    alive = bytes_alive_at_loads(monkeypatch)
    inputs = batch(prompts5())
    mmsink.wrap(llava, prune=method, **opts)
    try:
        whole = mmsink.generate_fast(llava, max_new_tokens=4, compile=False, **inputs)
        (full,) = alive
        alive.clear()
        out = mmsink.generate_fast(llava, max_new_tokens=4, compile=False, prefill_batch=2, **inputs)
    finally:
        mmsink.unwrap(llava)
    assert torch.equal(out, whole)
    assert full > 0 and len(alive) == 3
    assert max(alive) * 5 == full * 2 and alive[-1] * 5 == full, (alive, full)


def test_tail_runs_on_one_chunk_at_a_time(llava, monkeypatch):
    """``prune="none"`` hands off before the first layer (its cache holds no keys): the layers run in
    generate_fast on the chunk's hidden states, never the batch's."""
    rows = []
    real = fastmod.FastDecoder.tail
    monkeypatch.setattr(
        fastmod.FastDecoder,
        "tail",
        lambda self, first, h, *a: rows.append(h.shape[0]) or real(self, first, h, *a),
    )
    mmsink.wrap(llava, prune="none")
    try:
        mmsink.generate_fast(llava, max_new_tokens=3, compile=False, prefill_batch=2, **batch(prompts5()))
    finally:
        mmsink.unwrap(llava)
    assert rows == [2, 2, 1]


def test_graphed_decode_after_chunks(llava, monkeypatch):
    """The graphed path on CPU (capture replaced by a stand-in that replays by re-running the step): the
    decode step is captured after the last chunk is loaded, its warm-up step undone (the chunks' caches
    cannot be loaded again), then replayed; a second call replays the kept decoder. Same tokens."""
    captured = []

    def stand_in(fn):
        out = fn()
        captured.append(fn)
        return out, fn

    monkeypatch.setattr(fastmod, "capture_graph", stand_in)
    inputs = batch(prompts5())
    mmsink.wrap(llava, prune="fastv", budget=6)
    fast_clear(llava)
    try:
        whole = mmsink.generate_fast(llava, max_new_tokens=8, graphs=False, compile=False, **inputs)
        for _ in range(2):
            out = mmsink.generate_fast(
                llava, max_new_tokens=8, graphs=True, compile=False, prefill_batch=2, **inputs
            )
            assert torch.equal(out, whole)
    finally:
        mmsink.unwrap(llava)
    assert len(captured) == 1


def test_shorter_later_chunks_leave_invalid_slots(llava, monkeypatch):
    """Chunks keep as many slots per layer as their longest row needs: a later chunk that keeps fewer than
    the first leaves the rest of its rows' slots invalid (buffers sized exactly here: no rounding)."""
    monkeypatch.setattr(store, "ROUND", 1)
    ps = prompts5()
    inputs = batch([ps[2], ps[4], ps[0], ps[1], ps[3]])  # the two-image prompt first
    mmsink.wrap(llava, prune="fastv", budget=6)
    try:
        chunked_equals_whole(llava, inputs)
    finally:
        mmsink.unwrap(llava)
        fast_clear(llava)


def test_a_later_chunk_beyond_the_decoders_room_is_refused(llava, monkeypatch):
    monkeypatch.setattr(store, "ROUND", 1)
    inputs = batch(prompts5())  # chunk 0 (rows 0-1) keeps fewer slots than chunk 1 (the two-image prompt)
    mmsink.wrap(llava, prune="fastv", budget=6)
    try:
        with pytest.raises(ValueError, match=r"prefill_batch=2: rows 2-3 keep \d+ slots in layer 2") as e:
            mmsink.generate_fast(llava, max_new_tokens=8, compile=False, prefill_batch=2, **inputs)
    finally:
        mmsink.unwrap(llava)
        fast_clear(llava)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_bad_prefill_batch(llava, bad):
    with pytest.raises(ValueError, match="prefill_batch must be a positive integer or None") as e:
        mmsink.generate_fast(llava, max_new_tokens=2, prefill_batch=bad, **batch([prompt(2, 3)]))
    assert "\n" not in str(e.value)


def test_a_batch_no_larger_than_the_chunk_runs_whole(llava, monkeypatch):
    """prefill_batch >= the batch: one prefill, as without it."""
    alive = bytes_alive_at_loads(monkeypatch)
    inputs = batch(prompts5()[:3])
    whole = mmsink.generate_fast(llava, max_new_tokens=4, compile=False, **inputs)
    out = mmsink.generate_fast(llava, max_new_tokens=4, compile=False, prefill_batch=3, **inputs)
    assert torch.equal(out, whole) and len(alive) == 2 and alive[0] == alive[1]


def test_kv_modes_refuse_prefill_batch(llava):
    mmsink.wrap(llava, kv={"window": 16, "sinks": 4})
    try:
        with pytest.raises(ValueError, match="prefill_batch does not apply to the kv window mode yet"):
            mmsink.generate_fast(llava, max_new_tokens=2, prefill_batch=1, **batch(prompts5()[:2]))
    finally:
        mmsink.unwrap(llava)


def test_inputs_that_cannot_be_split(llava):
    inputs = batch(prompts5()[:3])
    pos = inputs["attention_mask"].cumsum(-1)
    bad = dict(inputs, position_ids=torch.cat([pos, pos[:1]]))  # a first dim that is not the batch
    with pytest.raises(ValueError, match=r"cannot split position_ids \(first dim 4, not the batch 3\)"):
        mmsink.generate_fast(llava, max_new_tokens=2, prefill_batch=2, **bad)
    few = dict(inputs, pixel_values=inputs["pixel_values"][:1])  # the prompts hold 4 images
    with pytest.raises(ValueError, match="the prompts hold 4 images, pixel_values 1 rows"):
        mmsink.generate_fast(llava, max_new_tokens=2, prefill_batch=2, **few)
    assert (inputs["input_ids"] == IMAGE_TOKEN).sum() == 4 * 36
    model = tiny_qwen("qwen2_vl", layers=2)
    q, _ = qwen_batch([(2, 3, [(4, 4)]), (1, 2, [])], seed=1)
    q["pixel_values_videos"] = torch.zeros(4, 3 * 2 * 14 * 14)
    with pytest.raises(ValueError, match=r"does not split videos \(pixel_values_videos\) yet"):
        mmsink.generate_fast(model, max_new_tokens=2, prefill_batch=1, **q)


@pytest.mark.parametrize("size", [None, 1])
def test_qwen_text_only_prompts_after_an_image_prompt(size):
    """Without an image the Qwen model computes no 3-D positions or rope deltas and keeps the last image
    prompt's deltas: generate_fast gives such prompts (a whole text-only batch, or a text-only chunk)
    get_rope_index's text positions and delta 0, so the tokens are generate's, not shifted by the earlier
    prompt's deltas."""
    model = tiny_qwen("qwen2_vl")
    img, _ = qwen_batch([(4, 6, [(8, 12)]), (2, 3, [(4, 8)])], seed=1)
    txt, _ = qwen_batch([(4, 6, []), (2, 13, [])], seed=2)
    mmsink.generate_fast(model, max_new_tokens=2, graphs=False, compile=False, **img)
    assert model.model.rope_deltas.abs().sum() > 0  # the image prompt's deltas, kept on the model
    out = mmsink.generate_fast(
        model, max_new_tokens=8, graphs=False, compile=False, prefill_batch=size, **txt
    )
    model.model.rope_deltas = None
    ref = model.generate(**txt, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)
