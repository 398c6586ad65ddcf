"""The decode step's GEMV kernel (``mmsink.fast.gemv``, ``StepOptions(fuse=True, gemv=True)``) against its
torch reference (fp32 sums of x @ w.T + bias + residual, one rounding), and greedy generate_fast with it
against generate.

Bound, element by element: ``K * 2 ** -23 * (|x| @ |w|.T + |bias| + |residual|)`` (two fp32 sums in
different orders, each within K units of fp32 of the sum of magnitudes) plus one unit of the output dtype
of ``|reference|`` (both sides round once to it, possibly the other way).

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernel is
defined, so in a subprocess: this file run as a script prints one JSON line per case); with CUDA the
``gpu`` tests run it compiled. Cases: 1 to 4 rows, with and without bias and residual, K not a multiple of
BLOCK_K, N not a multiple of BLOCK_N, a weight that is a row slice of a larger tensor (the fused step's)
or has a row stride past K, x with a row stride past K, both forms of the inner product (``dot``, 16-bit
only; element-wise), through ``linear`` (the custom op, leading dims as the step's [B, 1, K])."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from triton_run import compile_for_hopper, interpret, on_gpu, print_cases

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)
BASE = dict(m=1, n=40, k=96, dtype="float32", bias=False, res=False, view=False, tune={})
SMALL = dict(block_n=16, block_k=32)  # several programs and K steps at interpreter sizes
DOT64 = dict(SMALL, block_k=64)
CASES = {
    "fp32 m1": dict(tune=SMALL),
    "fp32 m2 bias residual, K tail": dict(m=2, n=33, k=70, bias=True, res=True, tune=SMALL),
    "fp32 m3 bias, N tail, weight row stride past K": dict(
        m=3, n=17, k=50, bias=True, wstride=56, tune=SMALL
    ),
    "fp32 m4 residual, weight view": dict(m=4, n=48, k=64, res=True, view=True, tune=SMALL),
    "fp32 m4 default tune, K tail": dict(m=4, n=40, k=300, bias=True, res=True),
    "fp32 m2 x strided": dict(m=2, n=24, k=64, xstride=80, res=True, tune=SMALL),
    "bf16 m1 dot": dict(dtype="bfloat16", tune=SMALL),
    "bf16 m4 dot bias residual view, K tail, x strided": dict(
        m=4, n=37, k=100, dtype="bfloat16", bias=True, res=True, view=True, xstride=104, tune=DOT64
    ),
    "bf16 m2 element-wise residual": dict(
        m=2, n=50, k=64, dtype="bfloat16", res=True, tune=dict(SMALL, dot=False)
    ),
    "bf16 m3 element-wise bias, K tail": dict(
        m=3, n=24, k=90, dtype="bfloat16", bias=True, tune=dict(SMALL, dot=False)
    ),
    "fp16 m2 dot bias residual": dict(m=2, n=40, k=64, dtype="float16", bias=True, res=True, tune=SMALL),
    "linear bf16 b4": dict(m=4, n=48, k=64, dtype="bfloat16", res=True, view=True, wrapper=True),
    "linear fp32 b2 bias": dict(m=2, n=48, k=64, bias=True, res=True, wrapper=True),
}
# LLaVA-1.5-7B's projections (N, K, residual fused) for the sm_90 compile and the GPU check
SHAPES_7B = {"qkv": (12288, 4096, False), "o": (4096, 4096, True), "gate_up": (22016, 4096, False),
             "down": (4096, 11008, True), "lm_head": (32064, 4096, False)}  # fmt: skip


def inputs(c: dict, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, c["dtype"])
    m, n, k = c["m"], c["n"], c["k"]

    def made(t):  # on the device in the dtype, before any slicing (a copy would drop the strides)
        return t.to(device, dt)

    x = made(torch.randn(m, c.get("xstride", k), generator=g))[:, :k]
    w = made(torch.randn(n + 24, c.get("wstride", k), generator=g) / k**0.5)[:, :k]
    w = w[10 : 10 + n] if c["view"] or "wstride" in c else w[:n].clone()  # a slice: offset, shared storage
    bias = made(torch.randn(n, generator=g)) if c["bias"] else None
    res = made(torch.randn(m, n, generator=g) * 4) if c["res"] else None
    return x, w, bias, res


def bound(x, w, bias, res, ref):
    mag = x.float().abs() @ w.float().abs().t()
    for t in (bias, res):
        mag = mag if t is None else mag + t.float().abs()
    return x.shape[-1] * 2.0**-23 * mag + torch.finfo(ref.dtype).eps * ref.float().abs()


def compare(name: str, seed: int, device="cpu") -> dict:
    from mmsink.fast import gemv

    c = {**BASE, **CASES[name]}
    x, w, bias, res = inputs(c, seed, device)
    want = gemv.reference(x, w, bias, res)
    if c.get("wrapper"):  # the step's form: [B, 1, K] through the custom op
        r3 = None if res is None else res[:, None]
        got = gemv.linear(x[:, None], w, bias, r3)
        ok_shape = got.shape == (c["m"], 1, c["n"])
        got = got[:, 0]
    else:
        got = gemv.launch(x, w, bias, res, **c["tune"])
        ok_shape = got.shape == (c["m"], c["n"])
    err = (got.float() - want.float()).abs()
    lim = bound(x, w, bias, res, want)
    return dict(
        over=float((err - lim).max()),
        err=float(err.max()),
        shape=bool(ok_shape and got.dtype == x.dtype),
        fits=gemv.fits(x, w, bias, res),
    )


@pytest.fixture(scope="module")
def interpreted():
    """Every case and seed through Triton's interpreter, in one subprocess."""
    return interpret(__file__)


def check(r: dict) -> None:
    assert r["over"] <= 0 and r["shape"] and r["fits"], r


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_equals_the_reference_interpreted(interpreted, name):
    for seed in SEEDS:
        check(interpreted[(name, seed)])


def test_generate_fast_with_the_gemv_equals_generate(interpreted):
    """generate_fast's fused step with ``gemv=True`` and the decode kernel (interpreter, CPU, fp32):
    greedy generate's tokens on a pruned, left-padded batch of 2; the kernel ran for all four projections
    of every layer (o_proj and down_proj with the residual)."""
    r = interpreted[("generate_fast", 0)]
    assert r["same_tokens"] and r["attention_calls"] > 0, r
    assert r["gemv_calls"] > 0 and r["gemv_calls"] == 2 * r["residual_calls"], r
    assert r["gemv_calls"] % (4 * r["layers"]) == 0 and r["rows"] == [2], r


def fast_vs_generate(device="cpu", compile=False) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import batch, prompt, tiny_llava

    import mmsink
    from mmsink.fast import decode_kernel as dk
    from mmsink.fast import gemv
    from mmsink.fast.fuse import StepOptions

    model = tiny_llava().to(device)
    inputs = {k: v.to(device) for k, v in batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)]).items()}
    mmsink.wrap(model, prune="fastv", budget=6)
    calls, attn = [], []
    plain, plain_attn = gemv.launch, dk.launch

    def counted(x, w, bias=None, residual=None, **kw):
        calls.append((x.shape[0], residual is not None))
        return plain(x, w, bias, residual, **kw)

    def counted_attn(*args, **kwargs):
        attn.append(1)
        return plain_attn(*args, **kwargs)

    gemv.launch, dk.launch = counted, counted_attn
    try:
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            step = StepOptions(fuse=True, attn="kernel", gemv=True)
            out = mmsink.generate_fast(model, max_new_tokens=4, compile=compile, step=step, **inputs)
    finally:
        gemv.launch, dk.launch = plain, plain_attn
    return dict(
        gemv_calls=len(calls),
        residual_calls=sum(r for _, r in calls),
        rows=sorted({m for m, _ in calls}),
        attention_calls=len(attn),
        layers=model.config.text_config.num_hidden_layers,
        same_tokens=bool(torch.equal(out, ref)),
    )


def test_kernel_compiles_for_hopper():
    """The kernel through Triton's whole compiler for sm_90 at LLaVA-1.5-7B's shapes, 1 and 4 rows, the
    default tune (bf16) and the element-wise form (fp32), with 16-byte aligned pointers and strides as a
    launch on the model's tensors specializes them; the default (dot) form's weight loads go through the
    software pipeline (async copies to shared memory: what keeps several tiles in flight)."""
    from mmsink.fast import gemv

    names = ("x_ptr", "w_ptr", "b_ptr", "r_ptr", "y_ptr")
    div = names + ("N", "K", "sx", "sw", "sr", "sy")
    for dt, ty in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        kernels = []
        for n, k, res in SHAPES_7B.values():
            for m in (1, 4):
                tune = gemv.config(m, n, k, dt)
                consts = dict(
                    M=m, BLOCK_N=tune["block_n"], BLOCK_K=tune["block_k"], BIAS=False, RES=res,
                    EVEN_K=k % tune["block_k"] == 0, DOT=tune["dot"], UP=False,
                )  # fmt: skip
                kernels.append((gemv._gemv_kernel, consts, tune["warps"], dict(num_stages=tune["stages"])))
        compiled = compile_for_hopper(kernels, dict.fromkeys(names, ty), div)
        for kernel, (_, consts, _, _) in zip(compiled, kernels):
            if consts["DOT"]:
                assert "async_copy_global_to_local" in kernel.asm["ttgir"], consts


def test_options():
    """``gemv`` needs ``fuse``; ``options`` takes it from a dict and names it among the known fields."""
    from mmsink.fast import fuse
    from mmsink.fast.fuse import StepOptions

    with pytest.raises(ValueError, match="fuse"):
        StepOptions(gemv=True)
    assert fuse.options({"fuse": True, "gemv": True}) == StepOptions(fuse=True, gemv=True)
    assert not StepOptions(fuse=True, gemv=True).plain and StepOptions().gemv is False
    with pytest.raises(ValueError, match="gemv"):
        fuse.options({"gmev": True})
    assert StepOptions(fuse=True).gemv is False  # the default step turns it on (test_fast_step)


def test_profile_spec():
    """evals/profile_decode.py's ``--configs`` spelling of it (the file beside this one: an editable
    install's ``mmsink.evals`` may be another checkout's)."""
    import importlib.util

    from mmsink.fast.fuse import StepOptions

    spec = importlib.util.spec_from_file_location("profile_decode", ROOT / "evals" / "profile_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    options_of = mod.options_of

    assert options_of("fuse+kernel+gemv") == StepOptions(fuse=True, attn="kernel", gemv=True)
    with pytest.raises(ValueError):
        options_of("kernel+gemv")  # without fuse


def test_cpu_falls_back_to_torch(monkeypatch):
    """On CPU without the interpreter ``linear`` is F.linear (+ the residual) exactly, for any rows, and
    the fused step with ``gemv=True`` gives generate's tokens without launching the kernel."""
    from mmsink.fast import gemv

    if gemv.INTERPRET:
        pytest.skip("the interpreter runs the kernel on CPU")

    def never(*args, **kwargs):
        raise AssertionError("the kernel ran on CPU")

    monkeypatch.setattr(gemv, "launch", never)
    g = torch.Generator().manual_seed(0)
    for rows in (1, 4, 6):
        x, r = torch.randn(rows, 1, 24, generator=g), torch.randn(rows, 1, 16, generator=g)
        w, b = torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
        assert not gemv.fits(x, w, b, r)
        assert torch.equal(gemv.linear(x, w, b, r), r + F.linear(x, w, b))
        assert torch.equal(gemv.linear(x, w), F.linear(x, w))
    r = fast_vs_generate("cpu")
    assert r["same_tokens"] and r["gemv_calls"] == 0, r


def test_fits():
    """What ``linear`` sends to the kernel where it is available: at most 4 rows, w's rows contiguous,
    dtypes alike; not when MMSINK_GEMV_KERNEL=0."""
    pytest.importorskip("triton")
    from mmsink.core import kernels
    from mmsink.fast import gemv

    w = torch.zeros(8, 16)
    x = torch.zeros(2, 1, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "INTERPRET", True)  # as under the interpreter: available on the CPU
        assert gemv.fits(x, w) and gemv.fits(torch.zeros(4, 16), w, torch.zeros(8), torch.zeros(4, 8))
        assert not gemv.fits(torch.zeros(5, 16), w)
        assert not gemv.fits(x, torch.zeros(16, 8).t())  # columns strided
        assert not gemv.fits(x.bfloat16(), w)
        assert not gemv.fits(x, w, residual=torch.zeros(2, 8))  # not x's leading shape
        mp.setenv("MMSINK_GEMV_KERNEL", "0")
        assert not gemv.fits(x, w) and not gemv.available("cuda")


@on_gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_equals_the_reference_cuda(name):
    for seed in SEEDS:
        check(compare(name, seed, "cuda"))


@on_gpu
@pytest.mark.parametrize("shape", sorted(SHAPES_7B))
def test_kernel_at_7b_shapes_cuda(shape):
    """bf16 at LLaVA-1.5-7B's shapes, 1 to 4 rows, the default tune: within the bound of the reference."""
    from mmsink.fast import gemv

    n, k, res = SHAPES_7B[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(n, k, generator=g, device="cuda") / k**0.5).bfloat16()
    for m in (1, 2, 3, 4):
        x = torch.randn(m, k, generator=g, device="cuda").bfloat16()
        r = torch.randn(m, n, generator=g, device="cuda").bfloat16() if res else None
        want = gemv.reference(x, w, None, r)
        got = gemv.launch(x, w, None, r)
        assert ((got.float() - want.float()).abs() <= bound(x, w, None, r, want)).all(), (shape, m)


@on_gpu
@pytest.mark.parametrize("compile", [False, True])
def test_generate_fast_with_the_gemv_equals_generate_cuda(compile):
    """fp32 on CUDA, plain and compiled (the custom op inside the compiled step and its CUDA graph)."""
    r = fast_vs_generate("cuda", compile)
    assert r["same_tokens"] and r["gemv_calls"] > 0 and r["gemv_calls"] == 2 * r["residual_calls"], r


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1): one JSON line per result
    print_cases(CASES, SEEDS, compare, {"generate_fast": fast_vs_generate})
