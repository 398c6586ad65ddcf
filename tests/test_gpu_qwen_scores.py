"""On a GPU: Qwen's VisionZip scores (``softmax_column_sums``: the attention each patch receives) from bf16 /
fp16 queries and keys through the GEMM with fp32 output equal those of the fp32 GEMM up to fp32 summation
order, at a real tower's segment size; the Triton kernels that ``Family.received`` runs instead for a whole
segment (``mmsink.core.received``) within their bound of the fp64 sums at a 1400x1400 image's size; and a
tiny bf16 Qwen2-VL keeps the same VisionZip set with either as with the fp32 GEMM. Skipped without CUDA
(tests/test_qwen.py pins the rule on the CPU, tests/test_received_kernel.py the kernels in the
interpreter)."""

import mmsink.patches.qwen2_vl as family
import pytest
import torch
from test_received_kernel import bound, exact
from tiny import prefill_stats, qwen_batch, tiny_qwen

from mmsink.core import received

pytestmark = pytest.mark.gpu


def fp32_sums(q, k, scale):
    return torch.softmax(q.float() @ k.float().transpose(1, 2) * scale, -1).sum(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_column_sums_equal_the_fp32_gemms(dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(16, 1024, 80, device="cuda", generator=g).to(dtype)  # a chunk of queries
    k = torch.randn(16, 2500, 80, device="cuda", generator=g).to(dtype) * 2
    got = family.softmax_column_sums(q, k, 80**-0.5)
    want = fp32_sums(q, k, 80**-0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not torch.equal(want, fp32_sums(q, k.roll(1, 1), 80**-0.5))  # the check can fail


@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_kernels_at_a_real_segment(seed):
    """16 heads, 10,000 patches (a 1400x1400 image), head dim 80, bf16: the kernels within
    tests/test_received_kernel.py's bound of the fp64 sums (worst case: about 4e-3 relative here), and of
    the GEMM path's sums (``Family.received``'s chunks of ``CHUNK`` queries) within twice that (each within
    its bound of the fp64 sums; the GEMM path's error terms are of the same kinds)."""
    if not received.available("cuda"):
        pytest.skip("needs Triton")
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(16, 10_000, 80, device="cuda", generator=g).bfloat16()
    k = (torch.randn(16, 10_000, 80, device="cuda", generator=g) * 2).bfloat16()
    scale = 80**-0.5
    got = received.launch(q, k, scale)
    chunks = range(0, q.shape[1], family.CHUNK)
    want = sum(exact(q[:, c : c + family.CHUNK], k, scale) for c in chunks)
    gemm = sum(family.softmax_column_sums(q[:, c : c + family.CHUNK], k, scale) for c in chunks)
    lim = bound(q, k, scale, want)
    assert got.shape == (16, 10_000) and got.dtype == torch.float32
    assert ((got.double() - want).abs() <= lim).all(), float(((got.double() - want).abs() / lim).max())
    assert ((got.double() - gemm.double()).abs() <= 2 * lim).all()
    assert not ((received.launch(q, k.roll(1, 1), scale).double() - want).abs() <= lim).all()


@pytest.mark.parametrize("path", ["kernels", "gemm"])
@pytest.mark.parametrize("seed", [1, 2])
def test_cuda_bf16_qwen_keeps_the_fp32_scores_set(monkeypatch, seed, path):
    """bf16 scores through the kernels (the default where Triton runs) or, with MMSINK_RECEIVED_KERNEL=0,
    through the GEMM with fp32 output: the set the fp32 GEMM's scores keep."""
    model = tiny_qwen("qwen2_vl").to("cuda", torch.bfloat16)
    inputs, _ = qwen_batch([(4, 6, [(8, 12)]), (2, 3, [(8, 8)])], seed=seed)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    calls, launch = [], received.launch
    monkeypatch.setattr(received, "launch", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    if path == "gemm":
        monkeypatch.setenv("MMSINK_RECEIVED_KERNEL", "0")
    elif not received.available("cuda"):
        pytest.skip("needs Triton")
    fast = prefill_stats(model, inputs, prune="visionzip", budget=0.5).kept_indices
    assert len(calls) == (2 if path == "kernels" else 0)  # one per image
    monkeypatch.setenv("MMSINK_RECEIVED_KERNEL", "0")
    monkeypatch.setattr(family, "softmax_column_sums", fp32_sums)
    plain = prefill_stats(model, inputs, prune="visionzip", budget=0.5).kept_indices
    assert fast == plain and len(calls) == (2 if path == "kernels" else 0)
