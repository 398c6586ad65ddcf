"""GPU paths (skipped without CUDA): fused LSE attention against plain matmuls, and pruned decoding on
CUDA giving the same tokens cached and uncached."""

import pytest
import torch
from tiny import batch, prompt, tiny_llava

import mmsink
from mmsink.attention import attention_lse, attention_lse_math

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_lse_cuda(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 64, device="cuda", generator=g, dtype=dtype) for _ in range(3))
    allowed = torch.rand(2, 1, 37, 37, device="cuda", generator=g) > 0.4
    allowed[:, :, 5] = False  # an empty row
    o, lse = attention_lse(q, k, v, allowed, 0.125)
    o_ref, lse_ref = attention_lse_math(q.float(), k.float(), v.float(), allowed, 0.125)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(o.float(), o_ref.nan_to_num(0.0), atol=tol, rtol=tol)
    ok = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[ok], lse_ref[ok], atol=tol, rtol=tol)
    assert torch.isneginf(lse[~ok]).all()


@pytest.mark.parametrize(
    "method,opts", [("fastv", {"budget": 6}), ("visipruner", {"budget": 5}), ("pdrop", {})]
)
def test_cuda_generate_cached_equals_uncached(method, opts):
    model = tiny_llava().cuda()
    inputs = {k: v.cuda() for k, v in batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)]).items()}
    mmsink.wrap(model, prune=method, **opts)
    with torch.no_grad():
        a = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        b = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "method,opts", [(None, {}), ("fastv", {"budget": 6}), ("pdrop", {}), ("visipruner", {})]
)
def test_cuda_graph_decode_equals_generate(method, opts):
    """generate_fast with the decode step captured as a CUDA graph gives greedy generate's tokens."""
    model = tiny_llava().cuda()
    inputs = {k: v.cuda() for k, v in batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)]).items()}
    mmsink.wrap(model, prune=method, **opts)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(mmsink.generate_fast(model, max_new_tokens=12, graphs=True, **inputs), ref)
    assert torch.equal(mmsink.generate_fast(model, max_new_tokens=12, graphs=False, **inputs), ref)
