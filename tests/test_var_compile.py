"""VAR's per-layer work through torch.compile (the CUDA default; forced here on the CPU with
``compile=True``): the eager path's outputs and the paper reference's, one graph for every layer of a
prompt, and eager where the compiler cannot run."""

import gc
import shutil
import warnings
import weakref

import pytest
import torch
from reference import run
from test_var import LAYERS, VAR
from tiny import batch, prompt, tiny_llava
from torch.utils._python_dispatch import TorchDispatchMode

import mmsink
from mmsink.core import attention
from mmsink.core.hooks import get_handle
from mmsink.sinks import var as var_mod
from mmsink.sinks.var import VARConfig

NO_CXX = shutil.which("c++") is None and shutil.which("g++") is None
needs_cxx = pytest.mark.skipif(NO_CXX, reason="torch.compile on CPU needs a C++ compiler")


def outputs(model, inputs, compile: bool, **settings):
    """Prefill logits, VAR's sink counts, generate's and generate_fast's tokens with VAR compiled or not
    (compiled: every one of the wrap's functions the run uses compiled, none fell back)."""
    mmsink.wrap(model, var={**VAR, "compile": compile}, **settings)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
            sinks = mmsink.stats(model).extra["var_sinks"]
            gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            fast = mmsink.generate_fast(model, max_new_tokens=5, **inputs)
        for name, fn in get_handle(model).var_compiled.items():
            if name == "key_codes":  # a prefill's codes come with its edit, in one call
                assert fn.compiled is None, name
                continue
            assert (fn.compiled is not None and not fn.failed) == compile, name
    finally:
        mmsink.unwrap(model)
    return logits, sinks, gen, fast


@needs_cxx
# eager attention slow (MMSINK_SLOW=1 runs it): its compiled edit differs only in the log-sum-exp's math
# form, which the eager path's tests (test_var.py) check against the reference
@pytest.mark.parametrize("attn", [pytest.param("eager", marks=pytest.mark.slow), "sdpa"])
def test_compiled_equals_eager_and_reference(attn):
    """fp32, tolerance 1e-5 (measured: 2e-7; fused kernels round differently, nothing else changes):
    prefill logits of one prompt and of a left-padded batch of three (two images in one), alone and
    with a pruner; the same sink tokens; the same tokens from generate (the edited decode rows) and
    from generate_fast (``decode_attention``); and the compiled prefill against the paper reference."""
    model = tiny_llava(layers=8, attn=attn)
    one = [prompt(5, 9, seed=1)]
    three = [prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(4, 9, seed=3, images=2)]
    for prompts, settings in ((one, {"prune": "fastv", "budget": 9}), (three, {"prune": None})):
        inputs = batch(prompts, seed=5)
        eager = outputs(model, inputs, False, **settings)
        compiled = outputs(model, inputs, True, **settings)
        torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
        assert compiled[1] == eager[1]
        assert torch.equal(compiled[2], eager[2]) and torch.equal(compiled[3], eager[3])
    inputs = batch(one, seed=5)
    with torch.no_grad():
        ref, _ = run(
            model,
            inputs["input_ids"][0],
            inputs["pixel_values"],
            "fastv",
            var=dict(VAR, layers=LAYERS),
            budget=9,
            k=2,
            num_layers=8,
        )
        mmsink.wrap(model, prune="fastv", budget=9, var={**VAR, "compile": True})
        try:
            got = model(**inputs).logits[0, -1]
        finally:
            mmsink.unwrap(model)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


@needs_cxx
def test_one_graph_for_all_layers():
    """A prefill compiles one graph (a layer's key codes and edit: one region), with VAR in 2 layers or
    in 6 (the layers share shapes and settings); a second prompt length recompiles it at most once (then
    dynamic), a third not."""
    from torch._dynamo.utils import counters

    model = tiny_llava(layers=8)
    lengths = [batch([prompt(5, n, seed=n)], seed=n) for n in (9, 6, 12)]

    def graphs(layers, prompts):
        torch._dynamo.reset()
        counters.clear()
        got = []
        mmsink.wrap(model, var={**VAR, "compile": True, "layers": layers})
        try:
            with torch.no_grad():
                for inputs in prompts:
                    model(**inputs)
                    got.append(counters["stats"]["unique_graphs"])
        finally:
            mmsink.unwrap(model)
        return got

    assert graphs((2, 3), lengths[:1]) == graphs(tuple(range(2, 8)), lengths[:1]) == [1]
    two, three = graphs(tuple(range(2, 8)), lengths)[1:]
    assert two <= 2 and three == two


@needs_cxx
def test_decode_attention_inside_a_compiled_caller():
    """A caller compiled with ``fullgraph`` (as a compiled decode layer step would be) traces VAR's
    decode attention into its own graph (no break) and gives the eager result (fp32, 1e-5)."""
    torch.manual_seed(0)
    b, h, kv_heads, slots, d = 2, 4, 2, 24, 8
    q = torch.randn(b, h, 1, d)
    k, v = torch.randn(b, kv_heads, slots, d), torch.randn(b, kv_heads, slots, d)
    valid = torch.rand(b, slots) > 0.2
    codes = torch.zeros(b, slots, dtype=torch.long)  # text sink, image (one visual sink), text
    codes[:, 0], codes[:, 3:19], codes[:, 6] = var_mod.TEXT_SINK, var_mod.VISUAL, var_mod.VISUAL_SINK
    cfg = VARConfig(**VAR, compile=True)
    want = var_mod.decode_attention(q, k, v, valid, codes, 0.35, VARConfig(**VAR, compile=False))
    caller = torch.compile(lambda *a: var_mod.decode_attention(*a) * 1.0, fullgraph=True)
    torch.testing.assert_close(caller(q, k, v, valid, codes, 0.35, cfg), want, atol=1e-5, rtol=1e-5)
    plain = var_mod.decode_attention(q, k, v, valid, codes, 0.35, VARConfig(**{**VAR, "p": 0.0}))
    assert (want - plain).abs().max() > 1e-3  # VAR changed the output: the comparison has teeth


class Counting(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_eager_under_a_mode_and_after_a_compiler_failure(monkeypatch):
    """Under a dispatch mode (the compiler refuses those) a call runs eagerly without compiling; a
    compiler error gives one warning and eager calls from then on; other errors propagate."""
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    c = var_mod.Compiled(fn)
    x = torch.ones(3)
    with Counting():
        assert torch.equal(c(x), x * 2)
    assert c.compiled is None and len(calls) == 1

    def broken(f, **kw):
        def call(*a):
            raise torch._dynamo.exc.Unsupported("no")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="did not compile"):
        assert torch.equal(c(x), x * 2)
    assert c.failed
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        c(x)  # eager without another attempt
    assert not seen
    assert len(calls) == 3

    def failing(f, **kw):
        def call(*a):
            raise ValueError("a real error")

        return call

    monkeypatch.setattr(torch, "compile", failing)
    with pytest.raises(ValueError, match="a real error"):
        var_mod.Compiled(fn)(x)


def test_compile_setting():
    """``compile``: None (default) is off on a CPU; True and False win on any device; others refused."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not var_mod.compiling(VARConfig(**VAR), cpu)
    assert var_mod.compiling(VARConfig(**VAR, compile=True), cpu)
    assert not var_mod.compiling(VARConfig(**VAR, compile=False), cuda)
    with pytest.raises(ValueError, match="compile must be"):
        VARConfig(**VAR, compile="yes")


def test_compiled_functions_belong_to_one_wrap(monkeypatch):
    """Each wrap has its own compiled functions: a compiler failure in one model's prefill leaves the
    other model compiling (a process-wide failure flag would turn it eager), both handles' objects are
    distinct, and ``unwrap`` drops them (the decoder ``generate_fast`` kept included). ``torch.compile``
    stands in: first failing, then handing back the function and recording what it was given."""
    a, b = tiny_llava(layers=4), tiny_llava(layers=4)
    inputs = batch([prompt(5, 9, seed=1)], seed=5)
    for m in (a, b):
        mmsink.wrap(m, var={**VAR, "compile": True})
    fa, fb = get_handle(a).var_compiled, get_handle(b).var_compiled
    assert fa is not fb
    assert all(x is not y for (_, x), (_, y) in zip(fa.items(), fb.items()))

    def broken(f, **kw):
        def call(*args):
            raise torch._dynamo.exc.Unsupported("no")

        return call

    given = []

    def passthrough(f, **kw):
        given.append(f.__name__)
        return f

    monkeypatch.setattr(torch, "compile", broken)
    with torch.no_grad(), pytest.warns(UserWarning, match="did not compile"):
        a(**inputs)
    assert fa.prefill_edit.failed and not fa.decode_attention.failed
    monkeypatch.setattr(torch, "compile", passthrough)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        b(**inputs)
        a(**inputs)  # eager from its failure on: no new attempt
        mmsink.generate_fast(b, max_new_tokens=3, **inputs)
    assert sorted(given) == ["decode_attention_fused", "prefill_edit"]
    assert not any(fn.failed for _, fn in fb.items())
    gone = [weakref.ref(x) for f in (fa, fb) for x in (f, *(fn for _, fn in f.items()))]
    del fa, fb
    mmsink.unwrap(a)
    mmsink.unwrap(b)
    gc.collect()
    assert all(r() is None for r in gone)


def test_one_compiled_call_per_var_layer(monkeypatch):
    """A prefill makes one compiled call per VAR layer (its key codes and edit together; each call costs
    the host a guard check and wrappers) and none elsewhere; a cached ``generate`` step one per VAR layer.
    ``torch.compile`` stands in (hands back the function), so the calls run eagerly and are counted; the
    prefill's logits, sink counts and tokens equal the eager path's (compile=False), whose codes are made
    apart. Fails on a prefill that makes the codes in a call of their own."""
    model = tiny_llava(layers=8)
    inputs = batch([prompt(5, 9, seed=1), prompt(2, 6, seed=2)], seed=5)  # left-padded
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    calls = []
    call = var_mod.Compiled.__call__

    def counting(self, *args):
        calls.append(self.fn.__name__)
        return call(self, *args)

    monkeypatch.setattr(var_mod.Compiled, "__call__", counting)
    got = {}
    for compile in (False, True):
        mmsink.wrap(model, var={**VAR, "compile": compile})
        try:
            with torch.no_grad():
                calls.clear()
                logits = model(**inputs).logits[:, -1]
                prefill = list(calls)
                sinks = mmsink.stats(model).extra["var_sinks"]
                calls.clear()
                gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
                steps = list(calls)
        finally:
            mmsink.unwrap(model)
        got[compile] = logits, sinks, gen, prefill, steps
    assert got[False][3] == got[False][4] == []
    assert got[True][3] == ["prefill_edit"] * len(LAYERS)
    # generate: its prefill, then two cached steps
    assert got[True][4] == ["prefill_edit"] * len(LAYERS) + ["edited_output"] * len(LAYERS) * 2
    torch.testing.assert_close(got[True][0], got[False][0], atol=1e-5, rtol=1e-5)
    assert got[True][1] == got[False][1] and torch.equal(got[True][2], got[False][2])


@pytest.mark.parametrize("lse", ["math", "unpadded", "padded"])
def test_edited_output_writes_the_edited_rows(lse):
    """The edit both paths run (``edit_rows``): as the compiled region gets it (``edited_output``, run here
    as plain code; math or unpadded log-sum-exp) and as the eager path calls it (``edit_index`` made
    apart, the padded kernel's log-sum-exp). With a padded row list and rows out of order, each edited row
    equals VAR's redistribution of its explicit attention row (``redistribute_rows`` on the full
    probabilities, then times v); the other rows keep the plain output bitwise."""
    torch.manual_seed(0)
    b, h, n, d = 2, 4, 10, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    out = torch.randn(b, h, n, d)
    allowed = attention.allowed_matrix(torch.ones(b, n, dtype=torch.bool), n)
    codes = torch.zeros(b, n, dtype=torch.long)  # text sink, image (a visual sink in it), text
    codes[:, 0], codes[:, 2:7], codes[:, 4] = var_mod.TEXT_SINK, var_mod.VISUAL, var_mod.VISUAL_SINK
    valid = torch.ones(b, n, dtype=torch.bool)
    ri = torch.tensor([[9, 7, 8], [8, 9, -1]])
    inv = var_mod.row_places(ri, n)
    cfg = VARConfig(**{**VAR, "rho": 0.0, "image_mass": 0.0})
    if lse == "padded":
        index = var_mod.edit_index(allowed, ri, inv)
        vec = var_mod.code_vector(q.device)
        got = var_mod.edit_rows(q, k, v, out, codes, valid, index, 0.35, cfg, attention.attention_lse, vec)
    else:
        got = var_mod.edited_output(q, k, v, out, codes, valid, allowed, ri, inv, 0.35, cfg, lse == "math")
    probs = torch.softmax((q @ k.transpose(-1, -2) * 0.35).masked_fill(~allowed, float("-inf")), -1)
    edited = torch.zeros(b, n, dtype=torch.bool)
    edited[0, [7, 8, 9]] = edited[1, [8, 9]] = True
    want = out.clone()
    for i, r in edited.nonzero().tolist():
        row = var_mod.redistribute_rows(probs[i : i + 1, :, r], codes[i : i + 1], torch.tensor([True]), cfg)
        want[i, :, r] = (row[..., None] * v[i : i + 1]).sum(2)[0]
    torch.testing.assert_close(got.transpose(1, 2), want, atol=1e-5, rtol=1e-5)
    plain = ~edited[:, None].expand(-1, h, -1)
    assert torch.equal(got.transpose(1, 2)[plain], out[plain])
    assert (want - probs @ v)[~plain].abs().amax(-1).min() > 1e-3  # VAR moved every edited row
