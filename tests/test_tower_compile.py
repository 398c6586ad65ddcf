"""The graphed vision tower's encoder layers through ``torch.compile`` (``vision_graph.patched(...,
compile=True)``, issue 20), on the CPU in fp32 with graph replays stood in (the captured function runs
again and copies into the captured outputs): the same features, logits and VisionZip picks as the eager
tower, the layers run by the compiled function (no Python frame of the layer's forward), one graph for
every layer, the model's modules exactly as before, and eager layers after a compiler failure."""

import shutil
import sys
import warnings

import pytest
import torch
from test_tower_first import Replays, stood_in
from test_tower_truncate import blocks, features, inputs_for, pixels, tower_out, towered
from torch._dynamo.utils import counters

import mmsink
from mmsink.fast import store, vision_graph

NO_CXX = shutil.which("c++") is None and shutil.which("g++") is None
pytestmark = pytest.mark.skipif(NO_CXX, reason="torch.compile on CPU needs a C++ compiler")
TOL = dict(atol=1e-5, rtol=1e-5)  # fp32; fused kernels round differently (measured: about 1e-6)


def snapshot(model) -> dict:
    """Every module's attributes (the objects themselves) and hooks, to tell any change apart."""
    out = {}
    for name, m in model.named_modules():
        attrs = dict(vars(m))
        hooks = {k: list(v.items()) for k, v in attrs.items() if k.endswith("hooks") and isinstance(v, dict)}
        out[name] = (attrs, hooks)
    return out


def changed(a: dict, b: dict) -> list:
    """[(module, attribute)] that differ between two snapshots."""
    if a.keys() != b.keys():
        return [(n, None) for n in a.keys() ^ b.keys()]
    out = []
    for name in a:
        (x, hx), (y, hy) = a[name], b[name]
        out += [(name, k) for k in x.keys() ^ y.keys()]
        out += [(name, k) for k in x.keys() & y.keys() if x[k] is not y[k] or hx.get(k) != hy.get(k)]
    return out


def forward_frames(code, fn):
    """(fn's result, how many Python frames of ``code`` it ran): a compiled layer runs none."""
    seen = []

    def prof(frame, event, arg):
        if event == "call" and frame.f_code is code:
            seen.append(1)

    sys.setprofile(prof)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return out, len(seen)


def run(model, d):
    with torch.no_grad():
        logits = model(**d).logits
    wrapped = "_mmsink" in model.__dict__
    return logits, features(model, d), mmsink.stats(model).kept_indices if wrapped else None


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method", [None, "visionzip"])
def test_compiled_tower_gives_the_eager_answers(family, method):
    """Two inputs, then the first again: logits, image features and VisionZip's kept tokens equal the
    eager model's (fp32, 1e-5). The layers before the cut run compiled (counted, and no frame of the
    layer's forward runs for them), except the one holding VisionZip's query / key taps, which runs
    eagerly; one graph for every layer; the model's modules unchanged after the call, and after
    ``unwrap`` and ``clear`` as before ``wrap``."""
    model = towered(family, -2)
    data = [inputs_for(model, s) for s in (0, 1)]
    tower_out(model, pixels(model, data[0]))  # transformers installs its output recorders at a first call
    before_wrap = snapshot(model)
    if method is not None:
        mmsink.wrap(model, prune=method, budget=0.5)
    try:
        taps = mmsink.api.get_handle(model).vision_taps if method is not None else []
        eager = [run(model, d) for d in data]
        assert not torch.allclose(eager[0][0], eager[1][0])
        calls = [0] * len(blocks(model))
        handles = [
            b.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
            for i, b in enumerate(blocks(model))
        ]
        torch._dynamo.reset()
        counters.clear()
        before = snapshot(model)
        with vision_graph.patched(model, taps, capture=Replays().capture, compile=True) as g:
            got = [run(model, d) for d in data + data[:1]]
            code = type(blocks(model)[0]).forward.__code__
            runs = calls[0]
            again, frames = forward_frames(code, lambda: run(model, data[1]))
            runs = calls[0] - runs  # tower runs in that call (the forward's and the features')
        after = snapshot(model)
        for h in handles:
            h.remove()
    finally:
        if method is not None:
            mmsink.unwrap(model)
        store.clear(model)
    cut = g.cut()
    tapped = {i for i, b in enumerate(blocks(model)) if any(m in {t for t, _ in taps} for m in b.modules())}
    assert cut == len(blocks(model)) - 1 and tapped == ({cut - 1} if method else set())
    assert g.compile and not g.failed and list(g.graphs)[0][2] is True
    assert calls[cut:] == [0] * (len(calls) - cut) and len(set(calls[:cut])) == 1
    assert g.compiled_calls == calls[0] * (cut - len(tapped)) > 0
    assert runs > 0 and frames == runs * len(tapped)  # only the tapped layer ran its Python forward
    assert int(counters["stats"]["unique_graphs"]) == 1
    for (lg, fg, kg), (le, fe, ke) in zip(got + [again], eager + eager[:1] + eager[1:]):
        torch.testing.assert_close(lg, le, **TOL)
        assert len(fg) == len(fe) and all(torch.allclose(a, b, **TOL) for a, b in zip(fg, fe))
        assert kg == ke
    assert changed(before, after) == [("", vision_graph.STORE)]  # the graphs kept on the model
    assert changed(before_wrap, snapshot(model)) == []
    assert all("forward" not in vars(b) and b._compiled_call_impl is None for b in blocks(model))


def test_compiled_and_eager_graphs_are_kept_apart():
    """The same tower with and without ``compile``: one graph each (the key holds it), and the eager one
    runs no compiled layer."""
    model = towered("llava_next", -2)
    x = pixels(model, inputs_for(model, 0))
    ref = tower_out(model, x).hidden_states[-2]
    with vision_graph.patched(model, [], capture=Replays().capture, compile=True) as g:
        a = tower_out(model, x).hidden_states[-2]
    n = g.compiled_calls
    with vision_graph.patched(model, [], capture=Replays().capture, compile=False) as g2:
        b = tower_out(model, x).hidden_states[-2]
    assert g2 is g and g.captures == 2 and sorted(k[2] for k in g.graphs) == [False, True]
    assert g.compiled_calls == n > 0
    torch.testing.assert_close(a, ref, **TOL)
    assert torch.equal(b, ref)
    vision_graph.clear(model)


def test_compiler_failure_runs_the_layers_eagerly():
    """A backend that fails: one warning, every layer eager from then on (the next graph too), the
    hidden states the eager tower's bitwise."""
    model = towered("llava_next", -2)
    xs = [pixels(model, inputs_for(model, s)) for s in (0, 1)]
    refs = [tower_out(model, x).hidden_states[-2] for x in xs]
    xs.append(torch.cat([xs[0], xs[1]]))  # another shape: a new graph
    refs.append(tower_out(model, xs[2]).hidden_states[-2])

    def broken(gm, example_inputs):
        raise RuntimeError("no backend here")

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with vision_graph.patched(model, [], capture=Replays().capture, compile=True) as g:
            g.compiled = torch.compile(vision_graph.layer_forward, backend=broken, fullgraph=True)
            got = [tower_out(model, x).hidden_states[-2] for x in xs]
    mine = [w for w in caught if "vision tower's layers did not compile" in str(w.message)]
    assert len(mine) == 1 and g.failed and g.compiled_calls == 0 and g.captures == 2
    for a, b in zip(got, refs):
        assert torch.equal(a, b)
    assert all("forward" not in vars(b) for b in blocks(model))
    vision_graph.clear(model)


@pytest.mark.parametrize("method", ["visionzip", "fastv"])
def test_generate_fast_tokens_through_the_compiled_tower(monkeypatch, method):
    """generate_fast with the graphed tower compiled (stood-in graphs; the decode eager) gives generate's
    greedy tokens on a tiny LLaVA-NeXT, and the tower's layers went through the compiled function."""
    model = towered("llava_next", -2)  # 4 layers: 2 compiled before VisionZip's tapped one
    model.generation_config.eos_token_id = None
    inputs = inputs_for(model, 0)
    mmsink.wrap(model, prune=method, budget=0.5)
    made = []
    real = vision_graph.patched

    def patched(m, taps, capture=None, compile=False, family=None):
        made.append(real(m, taps, capture=Replays().capture, compile=True, family=family))
        return made[-1]

    try:
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        stood_in(monkeypatch, Replays())  # (the tail's graphs too)
        monkeypatch.setattr(vision_graph, "patched", patched)
        store.clear(model)
        with torch.no_grad():
            got = mmsink.generate_fast(
                model, max_new_tokens=4, graphs=True, compile=False, tower_compile=True, **inputs
            )
    finally:
        mmsink.unwrap(model)
        store.clear(model)
    assert torch.equal(got, ref)
    assert made and made[-1].graph.compiled_calls > 0 and not made[-1].graph.failed


def qwen(depth: int):
    """A tiny Qwen2-VL (tiny.tiny_qwen, 4 text layers) whose vision tower has ``depth`` blocks."""
    from tiny import tiny_qwen

    model = tiny_qwen("qwen2_vl", layers=4, depth=depth)
    model.generation_config.eos_token_id = None
    return model


def qwen_run(model, d):
    with torch.no_grad():
        logits = model(**d).logits
    if "_mmsink" not in model.__dict__:
        return logits, None, None
    st = mmsink.stats(model)
    return logits, st.kept_indices, (st.prefill_flops, st.baseline_prefill_flops)


@pytest.mark.parametrize("method", [None, "visionzip", "fastv"])
def test_qwen_compiled_blocks_give_the_eager_answers(method):
    """Qwen2-VL's tower (not graphed) with ``compiled_blocks``: two prompts of two images each, then the
    first again: logits (fp32, 1e-5), VisionZip's kept tokens and the counted prefill FLOPs (the family's
    per-attention counter hook, traced into the blocks' graphs) equal the eager model's; every block runs
    compiled but the one holding VisionZip's taps; the model's modules unchanged after the call, and
    after ``unwrap`` and ``clear`` as before ``wrap``."""
    from tiny import qwen_batch

    model = qwen(4)
    data = [qwen_batch([(3, 5, [(8, 8), (4, 8)])], seed=s)[0] for s in (0, 1)]
    qwen_run(model, data[0])  # transformers' output recorders, installed at a first call
    before_wrap = snapshot(model)
    if method is not None:
        mmsink.wrap(model, prune=method, budget=0.5)
    try:
        eager = [qwen_run(model, d) for d in data]
        assert not torch.allclose(eager[0][0], eager[1][0])
        before = snapshot(model)
        qwen_run(model, data[0])
        own = changed(before, snapshot(model))  # what a forward itself sets (Qwen keeps its rope deltas)
        before = snapshot(model)
        blocks = model.model.visual.blocks
        code = type(blocks[0]).forward.__code__
        with vision_graph.compiled_blocks(model) as entered:
            got = [qwen_run(model, d) for d in data]
            again, frames = forward_frames(code, lambda: qwen_run(model, data[0]))
        after = snapshot(model)
        runner = model.__dict__[vision_graph.BLOCKS]
    finally:
        if method is not None:
            mmsink.unwrap(model)
        store.clear(model)
    tapped = 1 if method == "visionzip" else 0  # the last block's attention and its qkv
    assert entered is None and not runner.failed
    assert runner.compiled_calls == 3 * (len(blocks) - tapped)
    assert frames == tapped
    for (lg, kg, fg), (le, ke, fe) in zip(got + [again], eager + eager[:1]):
        torch.testing.assert_close(lg, le, **TOL)
        assert kg == ke and fg == fe
    assert sorted(changed(before, after)) == sorted(own + [("", vision_graph.BLOCKS)])  # + compiler state
    assert sorted(changed(before_wrap, snapshot(model))) == sorted(own)


def test_qwen_blocks_share_their_graphs():
    """One compile for every block: a 6-block tower makes no more graphs than a 3-block one (a compile
    per block would), and another prompt of the same shapes makes none."""
    from tiny import qwen_batch

    made = []
    for depth in (3, 6):
        model = qwen(depth)
        data = [qwen_batch([(3, 5, [(8, 8)])], seed=s)[0] for s in (0, 1)]
        torch._dynamo.reset()
        counters.clear()
        with vision_graph.compiled_blocks(model):
            qwen_run(model, data[0])
            first = int(counters["stats"]["unique_graphs"])
            qwen_run(model, data[1])
        assert int(counters["stats"]["unique_graphs"]) == first > 0
        assert model.__dict__[vision_graph.BLOCKS].compiled_calls == 2 * depth
        made.append(first)
        vision_graph.clear(model)
    assert made[0] == made[1]


@pytest.mark.parametrize("method", ["visionzip", "fastv"])
def test_qwen_generate_fast_tokens_through_compiled_blocks(method):
    """generate_fast inside ``compiled_blocks`` (as a prefill runs it) gives generate's greedy tokens."""
    from tiny import qwen_batch

    model = qwen(4)
    inputs = qwen_batch([(3, 5, [(8, 8)])], seed=0)[0]
    mmsink.wrap(model, prune=method, budget=0.5)
    try:
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            with vision_graph.compiled_blocks(model):
                got = mmsink.generate_fast(model, max_new_tokens=4, compile=False, **inputs)
        runner = model.__dict__[vision_graph.BLOCKS]
        assert runner.compiled_calls > 0 and not runner.failed
    finally:
        mmsink.unwrap(model)
        store.clear(model)
    assert torch.equal(got, ref)


def test_tower_compile_follows_the_flag(monkeypatch):
    """generate_fast asks for the compiled tower when it compiles (default ``tower_compile=True``) and not
    with ``tower_compile=False``."""
    model = towered("llava_next", -2)
    model.generation_config.eos_token_id = None
    inputs = inputs_for(model, 0)
    mmsink.wrap(model, prune="visionzip", budget=0.5)
    asked = []
    real = vision_graph.patched

    def patched(m, taps, capture=None, compile=False, family=None):
        asked.append(compile)
        return real(m, taps, capture=Replays().capture, compile=False, family=family)

    try:
        stood_in(monkeypatch, Replays())
        monkeypatch.setattr(vision_graph, "patched", patched)
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the decode steps: no real compile
        with torch.no_grad():
            for flag in (None, True, False):
                kw = {} if flag is None else {"tower_compile": flag}
                mmsink.generate_fast(model, max_new_tokens=2, graphs=True, compile=True, **kw, **inputs)
    finally:
        mmsink.unwrap(model)
        store.clear(model)
    assert asked == [True, True, False]
