"""The KV modes (issue 17) through ``generate_fast`` on a GPU: CUDA-graph replays (and, for one case each,
the compiled layer step) give ``generate``'s tokens, fp32, left-padded batch of two."""

from __future__ import annotations

import pytest
import torch
from tiny import batch, prompt, tiny_llava

import mmsink

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

MODES = {
    "window": {"kv": {"window": 24, "sinks": 4}},
    "window+fastv": {"prune": "fastv", "budget": 8, "kv": {"window": 24, "sinks": 4}},
    "int4": {"kv": {"quant": "int4", "keep_sinks": True}},
    "int2": {"kv": {"quant": "int2", "group_size": 16, "keep_sinks": True}},
    "int8": {"kv": {"quant": "int8"}},
    "lfps": {"kv": {"sparse": "lfps", "topk": 16}},
}


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=3).cuda()


@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "graphs+compile"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_generate_fast_kv_mode_cuda_equals_generate(model, mode, compile):
    if MODES[mode]["kv"].get("quant") in ("int2", "int4"):
        pytest.importorskip("optimum.quanto")
    if compile and mode not in ("window", "int4"):
        pytest.skip("compiled step: one window and one quant case")
    inputs = {k: v.cuda() for k, v in batch([prompt(3, 5, seed=1), prompt(9, 11, seed=2)]).items()}
    mmsink.wrap(model, **MODES[mode])
    try:
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            fast = mmsink.generate_fast(model, max_new_tokens=12, compile=compile, **inputs)
            again = mmsink.generate_fast(model, max_new_tokens=12, compile=compile, **inputs)  # replayed
    finally:
        mmsink.unwrap(model)
    assert torch.equal(fast.cpu(), ref.cpu()), mode
    assert torch.equal(again.cpu(), ref.cpu()), mode
