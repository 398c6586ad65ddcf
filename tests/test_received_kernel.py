"""The received-attention kernels (``mmsink.core.received``: VisionZip's scores on Qwen2-VL's tower) against
an fp64 reference of the softmax column sums, and Qwen2-VL's VisionZip set with them against torch's path.

Bound, column by column, relative: ``u * (2 ln2 hd L + 8 (L + log2 P) + 2P + C + 32)`` with ``u = 2 ** -23``
(one fp32 unit, covering the GPU's approximate exp2 / log2) and ``L = scale * log2(e) * max_ij sum_d
|q_id k_jd|`` (the largest score in base 2, in magnitude). Why: with 16-bit inputs the products are exact in
fp32, so a score's dot is off by at most ``hd u`` of its sum of magnitudes (``hd u L`` in the exponent,
twice: the score itself and its row's log-sum-exp), each exponent's rounding and scaling adds a few units of
``L``; the row's sum of exponentials (P terms, rescaled per key block) and the column's sum (C terms, all
positive) each at most their length in units. Plus ``C * 2 ** -125`` absolute (terms below fp32's normal
range, flushed to zero on a GPU). A kernel that misses one key or query block is off by far more; the
"rolled" case (keys rolled by one against the reference's) must fail it.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernels are
defined, so in a subprocess: this file run as a script prints one JSON line per case); with CUDA the
``gpu`` tests run them compiled (tests/test_gpu_qwen_scores.py: the real size, the tiny bf16 Qwen2-VL).
Cases: 2-3 heads, head dims 80 (64 + 16 for ``tl.dot``), 64, 72 (the second part masked) and 8 (the tiny
Qwen's), P and C not multiples of the blocks and C != P, peaked softmax rows (large scores), views with a
row stride and offset as ``Family.received`` passes them, the default tune, fp16.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from triton_run import compile_for_hopper, interpret, on_gpu, print_cases

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
U = 2.0**-23
BASE = dict(h=3, c=37, p=53, hd=80, dtype="bfloat16", gain=1.0, tune=dict(block_m=16, block_n=16))
CASES = {
    "bf16 hd80 h3": {},
    "bf16 hd64 h2, C > P": dict(h=2, c=70, p=33, hd=64, tune=dict(block_m=32, block_n=16)),
    "bf16 hd72 h2, C < P": dict(h=2, c=20, p=90, hd=72),
    "bf16 hd8 h3 (the tiny Qwen's)": dict(hd=8, c=45, p=45),
    "bf16 hd80 peaked rows": dict(h=2, c=40, p=61, gain=4.0),
    "bf16 hd80 segment views": dict(h=3, c=50, p=50, views=True),
    "bf16 hd80 default tune": dict(h=2, c=150, p=150, tune={}),
    "fp16 hd80 h2": dict(h=2, c=33, p=47, dtype="float16"),
    "column_sums bf16 hd80": dict(h=2, c=29, p=29, wrapper=True, tune={}),
    "rolled": dict(h=2, c=30, p=30, rolled=True),
}


def inputs(c: dict, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, c["dtype"])
    h, n, p, hd = c["h"], c["c"], c["p"], c["hd"]
    if c.get("views"):  # as Family.received: q, k [n, H, hd] of all images, one segment's rows transposed
        q = (torch.randn(n + 7, h, hd, generator=g) * c["gain"]).to(device, dt)[5 : 5 + n].transpose(0, 1)
        k = (torch.randn(p + 7, h, hd, generator=g) * 2).to(device, dt)[3 : 3 + p].transpose(0, 1)
        return q, k
    q = (torch.randn(h, n, hd, generator=g) * c["gain"]).to(device, dt)
    k = (torch.randn(h, p, hd, generator=g) * 2).to(device, dt)
    return q, k


def exact(q, k, scale: float) -> torch.Tensor:
    """The column sums in fp64."""
    return torch.softmax(q.double() @ k.double().transpose(1, 2) * scale, -1).sum(1)


def bound(q, k, scale: float, want) -> torch.Tensor:
    """The module docstring's bound for each of want's [H, P] sums."""
    h, c, hd = q.shape
    p = k.shape[1]
    # the magnitudes in fp32 (exact products, sums within hd units: nothing to a bound); in row chunks
    mag = max(float((q.float().abs()[:, i : i + 1024] @ k.float().abs().transpose(1, 2)).max())
              for i in range(0, c, 1024))  # fmt: skip
    big = scale * math.log2(math.e) * mag
    rel = U * (2 * math.log(2) * hd * big + 8 * (big + math.log2(p)) + 2 * p + c + 32)
    return rel * want.abs() + c * 2.0**-125


def compare(name: str, seed: int, device="cpu") -> dict:
    from mmsink.core import received

    c = {**BASE, **CASES[name]}
    q, k = inputs(c, seed, device)
    scale = c["hd"] ** -0.5
    want = exact(q, k, scale)
    if c.get("wrapper"):
        got = received.column_sums(q, k, scale)
    else:
        got = received.launch(q, k.roll(1, 1) if c.get("rolled") else k, scale, **c["tune"])
    err = (got.double() - want).abs()
    return dict(
        worst=float((err / bound(q, k, scale, want)).max()),  # of the bound: <= 1 passes
        rel=float((err / want).max()),
        shape=bool(got.shape == (c["h"], c["p"]) and got.dtype == torch.float32),
        fits=received.fits(q, k),
    )


def family_paths(device="cpu") -> dict:
    """A tiny bf16 Qwen2-VL's VisionZip prefill with the kernels and with torch's path
    (``MMSINK_RECEIVED_KERNEL=0``): the scores ``Family.received`` returns and the kept sets."""
    import os

    sys.path.insert(0, str(Path(__file__).parent))
    import mmsink.patches.qwen2_vl as family
    from tiny import prefill_stats, qwen_batch, tiny_qwen

    from mmsink.core import received

    model = tiny_qwen("qwen2_vl").to(device, torch.bfloat16)
    inputs, _ = qwen_batch([(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)])], seed=1)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    scores, calls = [], []
    plain_received, plain_launch = family.Family.received, received.launch

    def recorded(self, taps):
        out = plain_received(self, taps)
        scores.append(out[0])
        return out

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return plain_launch(*args, **kwargs)

    family.Family.received, received.launch = recorded, counted
    try:
        kept = [prefill_stats(model, inputs, prune="visionzip", budget=0.5).kept_indices]
        launched = len(calls)
        os.environ["MMSINK_RECEIVED_KERNEL"] = "0"
        kept.append(prefill_stats(model, inputs, prune="visionzip", budget=0.5).kept_indices)
    finally:
        os.environ.pop("MMSINK_RECEIVED_KERNEL", None)
        family.Family.received, received.launch = plain_received, plain_launch
    a, b = scores
    return dict(
        launches=launched,
        segments=3,
        torch_launches=len(calls) - launched,
        rel=float(((a - b).abs() / b.abs()).max()),
        same_kept=kept[0] == kept[1],
    )


@pytest.fixture(scope="module")
def interpreted():
    """Every case and seed through Triton's interpreter, in one subprocess."""
    return interpret(__file__)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"rolled"}))
def test_kernels_equal_the_fp64_sums_interpreted(interpreted, name):
    for seed in SEEDS:
        r = interpreted[(name, seed)]
        assert r["worst"] <= 1 and r["shape"] and r["fits"], r


def test_the_check_can_fail_interpreted(interpreted):
    """Keys rolled by one against the reference's: the bound does not hold."""
    for seed in SEEDS:
        assert interpreted[("rolled", seed)]["worst"] > 1


def test_family_scores_with_the_kernels_interpreted(interpreted):
    """A tiny bf16 Qwen2-VL on the CPU under the interpreter: the kernels ran once per image (segment) and
    gave torch's fp32 scores within 1e-4 relative (the bound's order at head dim 8 and <= 96 patches a
    segment) and the same VisionZip set; with the switch off they did not run."""
    r = interpreted[("family", 0)]
    assert r["launches"] == r["segments"] and r["torch_launches"] == 0, r
    assert r["rel"] < 1e-4 and r["same_kept"], r


def test_cpu_takes_torch_path(monkeypatch):
    """Without the interpreter, on the CPU, or for fp32: ``fits`` is False and ``column_sums`` is torch's
    chunked path (equal to the reference up to the chunks' summation order)."""
    from mmsink.core import kernels, received

    if received.INTERPRET:
        pytest.skip("the interpreter runs the kernels on CPU")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 30, 16, generator=g), torch.randn(2, 20, 16, generator=g)
    assert not received.fits(q.bfloat16(), k.bfloat16())
    torch.testing.assert_close(received.column_sums(q, k, 0.25, chunk=7), received.reference(q, k, 0.25))
    with monkeypatch.context() as mp:
        mp.setattr(kernels, "INTERPRET", True)  # as under the interpreter: available on the CPU
        if received.triton is not None:
            assert received.fits(q.bfloat16(), k.bfloat16())
            assert not received.fits(q, k)  # fp32: tl.dot would round to tf32
            assert not received.fits(q.bfloat16(), k.half())
            assert not received.fits(q.bfloat16(), k[:, :, :8].bfloat16())
            mp.setenv("MMSINK_RECEIVED_KERNEL", "0")
            assert not received.fits(q.bfloat16(), k.bfloat16()) and not received.available("cuda")


def test_split():
    from mmsink.core.received import split

    assert [split(d) for d in (80, 64, 72, 8, 128, 100)] == [
        (64, 16), (64, 0), (64, 16), (16, 0), (128, 0), (64, 64)
    ]  # fmt: skip


def test_kernels_compile_for_hopper():
    """Both kernels through Triton's whole compiler for sm_90 with the default tune at Qwen2-VL's head dim
    (80: 64 + 16) and at 64, bf16 and fp16, pointers and strides 16-byte aligned as a launch on the tower's
    tensors specializes them; the loads of the loop's operands go through the software pipeline."""
    from mmsink.core import received

    tune = received.config(10_000, 10_000, 80, torch.bfloat16)
    for ty in ("*bf16", "*fp16"):
        ptr = {"q_ptr": ty, "k_ptr": ty, "lse_ptr": "*fp32", "out_ptr": "*fp32", "qk_scale": "fp32"}
        for fn in (received._lse_kernel, received._sums_kernel):
            div = [n for n in (*ptr, "sqh", "sqc", "skh", "skp") if n in fn.arg_names and n != "qk_scale"]
            for hd in (80, 64):
                d0, d1 = received.split(hd)
                consts = dict(HD=hd, D0=d0, D1=d1, BLOCK_M=tune["block_m"], BLOCK_N=tune["block_n"], UP=False)
                run = (fn, consts, tune["warps"], dict(num_stages=tune["stages"]))
                (kernel,) = compile_for_hopper([run], ptr, div)
                assert "async_copy_global_to_local" in kernel.asm["ttgir"], (fn, hd)


@on_gpu
@pytest.mark.parametrize("name", sorted(set(CASES) - {"rolled"}))
def test_kernels_equal_the_fp64_sums_cuda(name):
    """The interpreter's cases compiled (the tower's real size: tests/test_gpu_qwen_scores.py)."""
    for seed in SEEDS:
        r = compare(name, seed, "cuda")
        assert r["worst"] <= 1 and r["shape"] and r["fits"], r
    assert compare("rolled", 0, "cuda")["worst"] > 1


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1): one JSON line per result
    print_cases(CASES, SEEDS, compare, {"family": family_paths})
