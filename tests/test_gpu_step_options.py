"""On a GPU: ``generate_fast``'s decode-step options (fused projections, one KV write, the matmul, reduce
and Triton-kernel attention) in CUDA graphs with compile give greedy ``generate``'s tokens (fp32, padded
batch, pruned and not; ``step=None``, the fused default), and ``unwrap`` gives every weight back in its own
storage with its values. Run before an option became a default on CUDA. tests/test_fast_step.py checks the
same on the CPU. Skipped without CUDA."""

import pytest
import torch
from tiny import batch, prompt, tiny_llava

import mmsink
from mmsink.fast import clear
from mmsink.fast.fuse import FUSED, StepOptions

pytestmark = pytest.mark.gpu

STEPS = [
    None,  # the default on one GPU: the fused step
    StepOptions(fuse=True),
    StepOptions(fuse=True, write=True, attn="matmul"),
    StepOptions(attn="reduce"),
    StepOptions(fuse=True, attn="kernel"),
]


@pytest.mark.parametrize("method,opts", [(None, {}), ("fastv", {"budget": 6}), ("pdrop", {})])
def test_cuda_step_options_give_generates_tokens(method, opts):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_llava().cuda()
    model.generation_config.eos_token_id = None
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    prompts = [prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(3, 9, seed=3)]
    inputs = {k: v.cuda() for k, v in batch(prompts).items()}
    mmsink.wrap(model, prune=method, **opts)
    try:
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            for step in STEPS:
                for _ in range(2):  # captured, then replayed
                    out = mmsink.generate_fast(
                        model, max_new_tokens=12, graphs=True, compile=True, step=step, **inputs
                    )
                    assert torch.equal(out, ref), step
                    assert step is not None or FUSED in model.__dict__  # the default fused the weights
    finally:
        mmsink.unwrap(model)
        clear(model)
    ptrs = set()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][1]), n
        ptrs.add(p.data_ptr())
    assert len(ptrs) == len(before)  # each its own storage again
