"""On a GPU: Qwen's VisionZip scores (``softmax_column_sums``: the attention each patch receives) from bf16 /
fp16 queries and keys through the GEMM with fp32 output equal those of the fp32 GEMM up to fp32 summation
order, at a real tower's segment size; and a tiny bf16 Qwen2-VL keeps the same VisionZip set with either.
Skipped without CUDA (tests/test_qwen.py pins the rule on the CPU)."""

import mmsink.patches.qwen2_vl as family
import pytest
import torch
from tiny import prefill_stats, qwen_batch, tiny_qwen

pytestmark = pytest.mark.gpu


def fp32_sums(q, k, scale):
    return torch.softmax(q.float() @ k.float().transpose(1, 2) * scale, -1).sum(1)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_column_sums_equal_the_fp32_gemms(cuda, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(16, 1024, 80, device="cuda", generator=g).to(dtype)  # a chunk of queries
    k = torch.randn(16, 2500, 80, device="cuda", generator=g).to(dtype) * 2
    got = family.softmax_column_sums(q, k, 80**-0.5)
    want = fp32_sums(q, k, 80**-0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not torch.equal(want, fp32_sums(q, k.roll(1, 1), 80**-0.5))  # the check can fail


@pytest.mark.parametrize("seed", [1, 2])
def test_cuda_bf16_qwen_keeps_the_fp32_scores_set(cuda, monkeypatch, seed):
    model = tiny_qwen("qwen2_vl").to("cuda", torch.bfloat16)
    inputs, _ = qwen_batch([(4, 6, [(8, 12)]), (2, 3, [(8, 8)])], seed=seed)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    fast = prefill_stats(model, inputs, prune="visionzip", budget=0.5).kept_indices
    monkeypatch.setattr(family, "softmax_column_sums", fp32_sums)
    plain = prefill_stats(model, inputs, prune="visionzip", budget=0.5).kept_indices
    assert fast == plain
