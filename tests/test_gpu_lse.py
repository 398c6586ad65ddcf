"""``attention_lse`` on CUDA through both kernels ``lse_backend`` chooses between (cuDNN's fused attention
and the memory-efficient kernel), against ``attention_lse_math`` in fp32 and against each other: outputs
and log-sum-exps at VisiPruner / VAR shapes (batch 1 and 16, n == m and n != m, key counts not a multiple
of 8, per-head masks, GQA heads repeated, a key layout as the model's transpose leaves it), rows with no
allowed key (output 0, LSE -inf in both), rows whose first keys are all masked, and the compiled form.
The GPU tests are skipped without CUDA; the backend choice's own checks run on the CPU too."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmsink.core import attention as att

gpu = pytest.mark.gpu

# bf16 against the fp32 reference on the same bf16 inputs (the kernels round the probabilities to bf16
# before the value product; the scores and LSE accumulate in fp32)
OUT_TOL = dict(atol=2e-2, rtol=2e-2)
LSE_TOL = dict(atol=1e-2, rtol=1e-3)
# the two kernels against each other
PAIR_OUT_TOL = dict(atol=2e-2, rtol=2e-2)
PAIR_LSE_TOL = dict(atol=1e-2, rtol=1e-3)

# (batch, heads, kv heads, queries, keys, head dim, per-head mask)
SHAPES = [
    (1, 32, 32, 640, 576, 128, False),  # VisiPruner layer 0: every row, the image group's keys
    (16, 32, 32, 640, 640, 128, False),  # the brief's b16 shape, n == m
    (16, 32, 32, 64, 65, 128, False),  # text rows, the non-image group (65 keys: row stride padded)
    (16, 32, 32, 256, 641, 128, False),  # VAR prefill: 4 groups x 64 text rows over a 641-key prompt
    (2, 8, 2, 37, 300, 64, True),  # GQA 8 / 2 (heads repeated), per-head mask, head dim 64
    (2, 32, 32, 1, 705, 128, False),  # one row (a decode step's group row)
]


class Ops(TorchDispatchMode):
    """The aten ops a call dispatched (to see which kernel ran)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def inputs(b, h, kvh, n, m, d, per_head, seed=0, transposed=False):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    q = (2.0 * rand(b, h, n, d)).bfloat16()  # scores of std 2: LSE far from log(m)
    if transposed:  # the model's [B, m, H, d] projection viewed as [B, H, m, d]
        k, v = (rand(b, m, kvh, d).bfloat16().transpose(1, 2) for _ in range(2))
    else:
        k, v = (rand(b, kvh, m, d).bfloat16() for _ in range(2))
    k, v = att.repeat_kv(k, h // kvh), att.repeat_kv(v, h // kvh)
    hm = h if per_head else 1
    allowed = torch.rand(b, hm, n, m, device="cuda", generator=g) > 0.3
    if m > 160:
        allowed[:, :, : (n + 1) // 2, :160] = False  # the first key blocks all masked for half the rows
    if n > 2:
        allowed[:, :, n // 3] = False  # rows with no allowed key
        allowed[0, :, -1] = False
    if b > 1:
        allowed[1] = False  # a sample with none
    return q, k, v, allowed


def run(monkeypatch, backend, q, k, v, allowed, scale, masks=None):
    monkeypatch.setenv(att.LSE_ENV, backend)
    with Ops() as ops:
        o, lse = att.attention_lse(q, k, v, allowed, scale, masks)
    torch.cuda.synchronize()
    name = {"cudnn": "_scaled_dot_product_cudnn_attention", "efficient": "_efficient_attention"}[backend]
    assert any(name in op for op in ops.names), (backend, sorted(set(ops.names)))
    return o, lse


def check(q, k, v, allowed, scale, got):
    o_ref, lse_ref = att.attention_lse_math(q.float(), k.float(), v.float(), allowed, scale)
    ok = torch.isfinite(lse_ref)  # rows with an allowed key
    none = ~allowed.any(-1).expand_as(ok)
    assert none.any() and ok.any()
    for o, lse in got.values():
        assert o.shape == q.shape and lse.shape == lse_ref.shape and lse.dtype == torch.float32
        assert not o.isnan().any() and not lse.isnan().any()
        torch.testing.assert_close(o.float()[ok], o_ref[ok], **OUT_TOL)
        torch.testing.assert_close(lse[ok], lse_ref[ok], **LSE_TOL)
        assert torch.isneginf(lse[none]).all()
        assert (o[none] == 0).all()
    (oc, lc), (oe, le) = got["cudnn"], got["efficient"]
    torch.testing.assert_close(oc.float(), oe.float(), **PAIR_OUT_TOL)
    torch.testing.assert_close(lc[ok], le[ok], **PAIR_LSE_TOL)
    assert torch.equal(torch.isneginf(lc), torch.isneginf(le))


@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_h{}_kv{}_n{}_m{}_d{}_ph{}".format(*s))
def test_cudnn_and_efficient_equal_math(monkeypatch, shape):
    b, h, kvh, n, m, d, per_head = shape
    q, k, v, allowed = inputs(b, h, kvh, n, m, d, per_head)
    scale = d**-0.5
    got = {be: run(monkeypatch, be, q, k, v, allowed, scale) for be in att.LSE_BACKENDS}
    check(q, k, v, allowed, scale, got)


@gpu
def test_backend_choice(monkeypatch):
    """The efficient kernel by default; cuDNN where asked for and it runs (sm_80+; fp16 / bf16; a head
    dim that is a multiple of 8)."""
    monkeypatch.delenv(att.LSE_ENV, raising=False)
    q, k, v, allowed = inputs(2, 8, 8, 40, 72, 128, False)
    some, bias = att.lse_masks(allowed, q.dtype)
    assert att.lse_backend(q, bias) == "efficient"
    monkeypatch.setenv(att.LSE_ENV, "cudnn")
    want = "cudnn" if torch.cuda.get_device_capability()[0] >= 8 else "efficient"
    assert att.lse_backend(q, bias) == want
    assert att.lse_backend(q.float(), bias.float()) == "efficient"  # no fp32 cuDNN kernel
    assert att.lse_backend(q[..., :100], bias) == "efficient"  # head dim not a multiple of 8
    monkeypatch.setenv(att.LSE_ENV, "efficient")
    assert att.lse_backend(q, bias) == "efficient"


@gpu
@pytest.mark.parametrize("m", [72, 75])
def test_transposed_keys_and_unpadded_bias(monkeypatch, m):
    """Keys / values in the model's layout (not contiguous) and VAR's unpadded bias (a plain ``where``;
    at 75 keys its rows are not 8-aligned and both kernels get it copied padded: eagerly they refuse it)."""
    q, k, v, allowed = inputs(2, 32, 8, 48, m, 128, False, seed=1, transposed=True)
    scale = 128**-0.5
    bias = torch.where(allowed, 0.0, float("-inf")).to(q.dtype)
    assert att._aligned(bias) == (m % 8 == 0)
    masks = (allowed.any(-1), bias)
    got = {be: run(monkeypatch, be, q, k, v, allowed, scale, masks) for be in att.LSE_BACKENDS}
    check(q, k, v, allowed, scale, got)


@gpu
@pytest.mark.parametrize("m", [72, 75])
def test_compiled(monkeypatch, m):
    """The form VAR's compiled region traces (``attention_lse_unpadded``): no graph break, and the same
    answer; with cuDNN asked for, at 75 keys the compiled call stays on the efficient kernel."""
    monkeypatch.setenv(att.LSE_ENV, "cudnn")
    torch._dynamo.reset()
    q, k, v, allowed = inputs(2, 8, 8, 48, m, 128, False, seed=2)
    scale = 128**-0.5

    def fn(q, k, v, allowed):
        bias = torch.where(allowed, 0.0, float("-inf")).to(q.dtype)
        return att.attention_lse(q, k, v, allowed, scale, (allowed.any(-1), bias))

    o, lse = torch.compile(fn, fullgraph=True)(q, k, v, allowed)
    o_ref, lse_ref = att.attention_lse_math(q.float(), k.float(), v.float(), allowed, scale)
    ok = torch.isfinite(lse_ref)
    torch.testing.assert_close(o.float()[ok], o_ref[ok], **OUT_TOL)
    torch.testing.assert_close(lse[ok], lse_ref[ok], **LSE_TOL)
    assert torch.isneginf(lse[~ok]).all() and (o[~ok] == 0).all()


def test_backend_choice_cpu(monkeypatch):
    """On the CPU (the CPU kernel runs whatever the choice): efficient, also when cuDNN is asked for;
    an unknown value is an error, not a silent default."""
    q = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    bias = torch.zeros(1, 1, 3, 8, dtype=torch.bfloat16)
    monkeypatch.delenv(att.LSE_ENV, raising=False)
    assert att.lse_backend(q, bias) == "efficient"
    monkeypatch.setenv(att.LSE_ENV, "cudnn")
    assert att.lse_backend(q, bias) == "efficient"
    monkeypatch.setenv(att.LSE_ENV, "flash")
    with pytest.raises(ValueError, match="MMSINK_LSE_ATTENTION"):
        att.lse_backend(q, bias)
    assert att._aligned(att.lse_masks(torch.ones(2, 1, 3, 5, dtype=torch.bool), torch.bfloat16)[1])
    assert not att._aligned(torch.zeros(2, 1, 3, 5))
