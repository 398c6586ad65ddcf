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


# ---- mmsink.stats after a chunked prefill: the whole batch, each chunk's stats merged

STATS_CASES = [
    ("fastv", {"budget": 6}),
    ("visionzip", {"budget": 8}),
    ("pdrop", {"budget": 12}),
    ("visipruner", {"budget": 5}),
    ("dart", {"budget": 8}),
    ("divprune", {"budget": 8}),
    ("orthorank", {"budget": 0.5, "form": "layers"}),
    ("sparsevlm", {"budget": 8}),
    ("cdpruner", {"budget": 8}),
]
# selection work the stats share out over a batch that depends on the batch's widest rows (SparseVLM's
# raters over the widest image and text; CDPruner's DPP up to the batch's largest k, its text over the
# widest prompt): a sample's share differs between batches
SHARED_BY_BATCH = {"sparsevlm", "cdpruner"}
PER_SAMPLE = ("kept_tokens", "kept_indices", "visual_tokens")


def prompts6():
    """Six prompts of different lengths (one with two images, one without an image): chunks of 2 and 3
    divide them, 4 does not; none of these chunks is the text-only prompt alone."""
    return prompts5() + [prompt(4, 3, seed=9)]


def llava_rows(inputs, prompts, lo: int, hi: int) -> dict:
    """Rows lo..hi-1 of a ``batch(prompts)`` at the batch's width (as a chunk runs), with their images."""
    per = [p.count(IMAGE_TOKEN) // 36 for p in prompts]
    pix = inputs["pixel_values"][sum(per[:lo]) : sum(per[:hi])]
    out = {"input_ids": inputs["input_ids"][lo:hi], "attention_mask": inputs["attention_mask"][lo:hi]}
    return out | {"pixel_values": pix if len(pix) else None}


def stats_of(model, inputs, **kw):
    mmsink.generate_fast(model, max_new_tokens=2, compile=False, **inputs, **kw)
    return mmsink.stats(model)


def check_merged(method, whole, merged, alone, sizes):
    """``merged`` (stats after prefill_batch) against ``whole`` (the batch at once) and ``alone`` (each
    chunk's rows run as a batch of their own at the batch's width), chunks of ``sizes`` rows."""
    for name in PER_SAMPLE:
        assert getattr(merged, name) == getattr(whole, name), name
    assert (merged.method, merged.budget) == (whole.method, whole.budget)
    # every sample's own FLOPs (it alone, unpadded) as the whole batch gives them; where the batch's
    # widest rows size the selection work shared out, as its own chunk gives them
    own = whole.extra["sample_prefill_flops"]
    if method in SHARED_BY_BATCH:
        own = [x for a in alone for x in a.extra["sample_prefill_flops"]]
    extra = {k: v for k, v in merged.extra.items() if k != "chunks"}
    assert extra == whole.extra | {"sample_prefill_flops": own}
    # FLOPs executed: each chunk pads to its own widths, so the total is the chunks' own runs' sum (not
    # the whole batch's); the baseline (every row at the batch's width) is linear in rows: the whole's
    assert merged.prefill_flops == sum(a.prefill_flops for a in alone)
    assert merged.baseline_prefill_flops == whole.baseline_prefill_flops
    assert merged.baseline_prefill_flops == sum(a.baseline_prefill_flops for a in alone)
    # padded slots: per layer the widest chunk's
    assert merged.tokens_per_layer == [max(w) for w in zip(*(a.tokens_per_layer for a in alone))]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert merged.extra["chunks"] == [
        {
            "rows": [lo, lo + n],
            "tokens_per_layer": a.tokens_per_layer,
            "prefill_flops": a.prefill_flops,
            "baseline_prefill_flops": a.baseline_prefill_flops,
        }
        for lo, n, a in zip(starts, sizes, alone)
    ]


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("method,opts", STATS_CASES)
def test_chunked_stats_describe_the_whole_batch(llava, method, opts, size):
    """After ``prefill_batch=size`` the stats are the whole batch's: per layer and sample the kept tokens
    and their indices, the visual tokens, the pruner's per-sample and batch-wide entries (VisiPruner's
    fusion layers, PDrop's and SparseVLM's schedules, OrthoRank's updated / held per layer) exactly as
    the batch prefilled at once gives them, and each sample's own FLOPs (what it alone, unpadded, would
    execute) too, except where the stats share out selection work sized by the batch's widest rows
    (SparseVLM, CDPruner): there a sample's share is its chunk's, as the chunk alone gives it. The
    executed FLOPs are the sum of each chunk run alone at the batch's width (a chunk pads to its own
    widest row, so it can differ from the whole batch's); the baseline is the whole batch's; the padded
    slots per layer are the widest chunk's (here also the whole batch's: its widest row is in one)."""
    ps = prompts6()
    inputs = batch(ps)
    b = len(ps)
    sizes = [min(size, b - lo) for lo in range(0, b, size)]
    mmsink.wrap(llava, prune=method, **opts)
    try:
        whole = stats_of(llava, inputs)
        merged = stats_of(llava, inputs, prefill_batch=size)
        alone = [stats_of(llava, llava_rows(inputs, ps, lo, lo + size)) for lo in range(0, b, size)]
    finally:
        mmsink.unwrap(llava)
    assert len(merged.visual_tokens) == b and len(merged.kept_tokens[0]) == b
    check_merged(method, whole, merged, alone, sizes)
    assert merged.tokens_per_layer == whole.tokens_per_layer
    if method == "fastv":  # (the invariants hold; the pruned total differs from the whole batch's here)
        assert merged.prefill_flops != whole.prefill_flops


@pytest.mark.parametrize(
    "method,opts",
    [("visipruner", {"budget": 5}), ("sparsevlm", {"budget": 8}), ("fastv", {"budget": 6, "var": VAR})],
)
def test_chunked_stats_with_a_text_only_chunk(llava, method, opts):
    """Chunks of one row: the text-only prompt's chunk runs untouched (as a text-only batch does), so it
    makes no pruner entries: its row gets what a prompt without images gets in a whole batch where that
    is known (VisiPruner's fusion layer -1, SparseVLM's empty per-image schedule), else None (VAR's sink
    counts: the chunk is not edited). It ran every slot of every layer: the padded slots are the widest
    chunk's, that one's."""
    ps = prompts5()
    inputs = batch(ps)
    text = 3
    assert IMAGE_TOKEN not in ps[text]
    mmsink.wrap(llava, prune=method, **opts)
    try:
        whole = stats_of(llava, inputs)
        merged = stats_of(llava, inputs, prefill_batch=1)
        alone = [stats_of(llava, llava_rows(inputs, ps, i, i + 1)) for i in range(len(ps))]
    finally:
        mmsink.unwrap(llava)
    if "var" in opts:
        whole.extra["var_sinks"] = {
            layer: {k: [None if i == text else x for i, x in enumerate(v)] for k, v in counts.items()}
            for layer, counts in whole.extra["var_sinks"].items()
        }
        assert "var_sinks" not in alone[text].extra
    check_merged(method, whole, merged, alone, [1] * len(ps))
    n = len(whole.tokens_per_layer)
    assert merged.tokens_per_layer == [inputs["input_ids"].shape[1]] * n != whole.tokens_per_layer


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("method,opts", [("fastv", {"budget": 4}), ("visionzip", {"budget": 0.5})])
def test_qwen_chunked_stats(method, opts, size):
    """Qwen2-VL (images of different grids, packed patch rows): the stats after chunks are the whole
    batch's, as for LLaVA."""
    model = tiny_qwen("qwen2_vl")
    specs = [(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)]), (3, 5, []), (1, 2, [(4, 4)]), (2, 2, [(8, 8)])]
    inputs, _ = qwen_batch(specs, seed=1)
    b = len(specs)
    images = [len(s[2]) for s in specs]
    patches = [h * w for s in specs for h, w in s[2]]

    def rows(lo, hi):
        i0, i1 = sum(images[:lo]), sum(images[:hi])
        p0, p1 = sum(patches[:i0]), sum(patches[:i1])
        part = {k: v[lo:hi] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
        has = i1 > i0
        pix, grid = inputs["pixel_values"][p0:p1], inputs["image_grid_thw"][i0:i1]
        return part | {"pixel_values": pix if has else None, "image_grid_thw": grid if has else None}

    mmsink.wrap(model, prune=method, **opts)
    whole = stats_of(model, inputs, graphs=False)
    merged = stats_of(model, inputs, graphs=False, prefill_batch=size)
    alone = [stats_of(model, rows(lo, lo + size), graphs=False) for lo in range(0, b, size)]
    check_merged(method, whole, merged, alone, [min(size, b - lo) for lo in range(0, b, size)])


def test_chunked_stats_keep_no_activations(llava):
    """Each chunk's stats wait, deferred, until asked for: the chunk's prefill state they hold keeps no
    rotary tables ([rows, length, head dim] each) nor tower outputs, only what the stats read."""
    mmsink.wrap(llava, prune="visionzip", budget=8)
    try:
        mmsink.generate_fast(llava, max_new_tokens=2, compile=False, prefill_batch=2, **batch(prompts6()))
        parts = mmsink.api.get_handle(llava).last_stats.parts
        ctxs = [part.args[1] for _, part in parts]
        assert len(ctxs) == 3 and all(c.taps == {} and c.position_embeddings is None for c in ctxs)
        assert len(mmsink.stats(llava).visual_tokens) == 6
    finally:
        mmsink.unwrap(llava)


def test_disabled_chunks_leave_the_stats(llava):
    """Under ``mmsink.disabled`` no prefill makes stats, chunked or not: the last ones stay."""
    mmsink.wrap(llava, prune="fastv", budget=6)
    try:
        before = stats_of(llava, batch(prompts5()[:2]))
        with mmsink.disabled(llava):
            mmsink.generate_fast(llava, max_new_tokens=2, compile=False, prefill_batch=2, **batch(prompts6()))
        assert mmsink.stats(llava) is before
    finally:
        mmsink.unwrap(llava)


def test_merge_of_batch_wide_and_unknown_entries():
    """``stats.merge`` on hand-made chunks: per-sample entries joined (a chunk without one fills its rows:
    -1 fusion layers, None VAR counts), a batch-wide fact the chunks agree on kept once, one they differ in
    (PDrop's layers from each chunk's largest image) and an entry the merge does not know kept per chunk;
    a chunk that made no stats leaves none."""
    from mmsink.core.stats import Chunked, Stats, merge

    def part(n, vis, extra, slots):
        flops = {"sample_prefill_flops": [10 * v for v in vis], "sample_baseline_prefill_flops": [20] * n}
        return Stats(
            "m", 4, [vis, vis], [[[v] for v in vis]] * 2, vis, 100 * n, 200 * n, slots, flops | extra
        )

    a = part(
        2, [3, 4], {"schedule": {"layers": [1, 2], "ratio": 0.5}, "fusion_layer": [2, -1], "new": 1}, [9, 5]
    )
    b = part(
        1,
        [6],
        {"schedule": {"layers": [1, 3], "ratio": 0.5}, "var_sinks": {2: {"visual": [1], "text": [0]}}},
        [7, 6],
    )
    got = merge([(slice(0, 2), a), (slice(2, 3), b)])
    assert got.kept_tokens == [[3, 4, 6]] * 2 and got.kept_indices == [[[3], [4], [6]]] * 2
    assert got.visual_tokens == [3, 4, 6] and got.tokens_per_layer == [9, 6]
    assert (got.prefill_flops, got.baseline_prefill_flops) == (300, 600)
    assert got.extra["sample_prefill_flops"] == [30, 40, 60]
    assert got.extra["fusion_layer"] == [2, -1, -1]
    assert got.extra["var_sinks"] == {2: {"visual": [None, None, 1], "text": [None, None, 0]}}
    assert got.extra["schedule"] == {"ratio": 0.5}
    assert "new" not in got.extra
    assert got.extra["chunks"] == [
        {
            "rows": [0, 2],
            "tokens_per_layer": [9, 5],
            "prefill_flops": 200,
            "baseline_prefill_flops": 400,
            "extra": {"schedule": {"layers": [1, 2]}, "new": 1},
        },
        {
            "rows": [2, 3],
            "tokens_per_layer": [7, 6],
            "prefill_flops": 100,
            "baseline_prefill_flops": 200,
            "extra": {"schedule": {"layers": [1, 3]}},
        },
    ]
    chunks = Chunked().add(slice(0, 2), lambda: a)
    assert chunks().visual_tokens == [3, 4]
    assert chunks.add(slice(2, 3), chunks)() is None  # the second chunk made no stats of its own
