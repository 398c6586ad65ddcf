"""On a GPU: ``generate_fast(prefill_batch=N)`` with its CUDA paths on (graphed tower per chunk shape,
compiled prefill tail writing into row views of the decoder's buffers, the decode step captured after the
last chunk) gives the tokens of ``generate`` and of the whole-batch prefill (fp32, so kernels' rounding
cannot part them). tests/test_fast_prefill_batch.py checks the same on the CPU. Skipped without CUDA."""

import pytest
import torch
from tiny import batch, next_batch, prompt, tiny_llava, tiny_llava_next

import mmsink

pytestmark = pytest.mark.gpu


def on_cuda(inputs: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def check(model, inputs, n: int = 10):
    """generate's greedy tokens == whole-batch generate_fast == chunked (1, 2) generate_fast, each twice
    (the second call replays what the first captured)."""
    want = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    assert want.shape[1] > inputs["input_ids"].shape[1] + 1
    for size in (None, 2, 1):
        for _ in range(2):
            got = mmsink.generate_fast(model, max_new_tokens=n, prefill_batch=size, **inputs)
            assert torch.equal(got, want), size


@pytest.mark.parametrize(
    "method,opts",
    [("none", {}), ("fastv", {"budget": 6}), ("visionzip", {"budget": 8}), ("dart", {"budget": 8})],
)
def test_cuda_llava_chunks_give_generates_tokens(method, opts):
    model = tiny_llava().cuda()
    model.generation_config.eos_token_id = None
    inputs = on_cuda(batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(6, 11, seed=5)]))
    mmsink.wrap(model, prune=method, **opts)
    try:
        check(model, inputs)
    finally:
        mmsink.unwrap(model)


@pytest.mark.parametrize("method,opts", [("none", {}), ("visionzip", {"budget": 8})])
def test_cuda_llava_next_chunks_give_generates_tokens(method, opts):
    model = tiny_llava_next()
    model.generation_config.eos_token_id = None
    specs = [(3, 4, [(56, 56)]), (2, 5, [(56, 56)]), (1, 6, [(56, 56)])]
    inputs, _ = next_batch(model, specs, seed=1)
    model.cuda()
    mmsink.wrap(model, prune=method, **opts)
    try:
        check(model, on_cuda(inputs))
    finally:
        mmsink.unwrap(model)
