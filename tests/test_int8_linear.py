"""evals/int8_linear.py: the Triton W8A8 kernels (run by Triton's CPU interpreter) against torch references,
and the Int8Linear forms against a plain float reference of the same quantizer."""

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# name: (check, its arguments); the tests below read their check's result
CHECKS = {
    "quantize_rows": ("check_quantize_rows", ()),
    "rescale_bias": ("check_rescale", (True,)),
    "rescale": ("check_rescale", (False,)),
    "gemm_128": ("check_gemm_rescale", (128,)),
    "gemm_96": ("check_gemm_rescale", (96,)),
}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Every check of this file in one fresh process with Triton's CPU interpreter (it must be chosen
    before triton is first imported): {name: None, or the check's traceback}."""
    paths = [str(ROOT), str(HERE)]
    code = f"import sys; sys.path[:0] = {paths!r}; import test_int8_linear as t; t.run_checks()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert set(out) == set(CHECKS)
    return out


def run_checks() -> None:
    """(In the interpreter's process) runs every check, then prints one JSON line of their results."""
    out = {}
    for name, (check, args) in CHECKS.items():
        try:
            globals()[check](*args)
            out[name] = None
        except Exception:
            out[name] = traceback.format_exc()
    print(json.dumps(out), flush=True)


def check_quantize_rows():
    from mmsink.evals import int8_linear as kernels

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(37, 96, generator=g).to(torch.bfloat16) * torch.logspace(-2, 2, 37)[:, None]
    rows[5] = 0  # an all-zero row takes the scale floor
    q, s = kernels.quantize_rows(rows)
    qr, sr = kernels.quantize_rows_ref(rows)
    torch.testing.assert_close(s, sr)
    diff = (q.int() - qr.int()).abs()
    assert diff.max() <= 1  # rounding ties only (half away from zero vs half to even)
    assert (diff > 0).float().mean() < 0.01


def check_rescale(bias):
    from mmsink.evals import int8_linear as kernels

    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-(2**20), 2**20, (19, 40), generator=g, dtype=torch.int32)
    xs, ws = torch.rand(19, 1, generator=g), torch.rand(40, generator=g)
    b = torch.randn(40, generator=g).to(torch.bfloat16) if bias else None
    y = kernels.rescale(acc, xs, ws, b, torch.bfloat16)
    ref = acc.double() * xs.double() * ws.double() + (b.double() if bias else 0)
    torch.testing.assert_close(y, ref.to(torch.bfloat16))


def check_gemm_rescale(k):
    from mmsink.evals import int8_linear as kernels

    g = torch.Generator().manual_seed(2)
    m, n = 45, 48  # neither a multiple of the 32-row / 32-column tile
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(m, 1, generator=g), torch.rand(n, generator=g)
    bias = torch.randn(n, generator=g)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}
    y = kernels.gemm_rescale(xq, xs, wq, ws, bias, torch.float32, config=cfg)
    ref = (xq.double() @ wq.double().t()) * xs.double() * ws.double() + bias.double()
    torch.testing.assert_close(y, ref.float(), rtol=1e-6, atol=1e-4)


def test_quantize_rows_matches_torch(interpreted):
    assert interpreted["quantize_rows"] is None, interpreted["quantize_rows"]


@pytest.mark.parametrize("name", ["rescale_bias", "rescale"])
def test_rescale_matches_torch(interpreted, name):
    assert interpreted[name] is None, interpreted[name]


@pytest.mark.parametrize("name", ["gemm_128", "gemm_96"])  # a whole number of K tiles, a ragged last tile
def test_gemm_rescale_matches_exact_product(interpreted, name):
    assert interpreted[name] is None, interpreted[name]


@pytest.mark.parametrize("form", ["eager", "fused", "triton"])
@pytest.mark.parametrize("rows", [3, 40])  # 3: under _int_mm's M > 16, padded
def test_int8_linear_equals_float_reference(form, rows):
    from mmsink.evals.int8_linear import Int8Linear

    torch.manual_seed(3)
    lin = nn.Linear(64, 32)
    x = torch.randn(rows, 64)
    y = Int8Linear(lin, form)(x[None])[0]
    # the same quantizer in float64, no int kernels
    w = lin.weight.double()
    ws = w.abs().amax(1).clamp_min(1e-8) / 127
    wq = (w / ws[:, None]).round().clamp(-127, 127)
    xs = x.double().abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
    xq = (x.double() / xs).round().clamp(-127, 127)
    ref = (xq @ wq.t()) * xs * ws + lin.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # and the quantization error against the float layer stays at the 8-bit level
    err = (y - lin(x)).pow(2).mean() / lin(x).pow(2).mean()
    assert err < 1e-3


def test_int8_linear_rejects_odd_features():
    from mmsink.evals.int8_linear import Int8Linear

    with pytest.raises(ValueError, match="multiples of 8"):
        Int8Linear(nn.Linear(12, 8))
