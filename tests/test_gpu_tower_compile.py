"""On a GPU: ``generate_fast``'s graphed vision tower with its encoder layers through ``torch.compile``
inside the CUDA graph (``compile`` on, the default on CUDA with Triton) gives greedy ``generate``'s
tokens in fp32 (tests/test_tower_compile.py checks the same on the CPU with stand-in graphs). Skipped
without CUDA."""

import pytest
import torch
from test_tower_truncate import inputs_for, towered

import mmsink
from mmsink.core.compiling import can_compile
from mmsink.fast import store, vision_graph

pytestmark = pytest.mark.gpu


def tower_graph(model):
    return next(iter(model.__dict__[vision_graph.STORE].values()))


@pytest.mark.parametrize("family", ["llava_next", "llava"])
@pytest.mark.parametrize("method", [None, "visionzip", "fastv"])
def test_cuda_compiled_tower_gives_generates_tokens(family, method):
    """Images A, B, A (4 tower layers, the model reading layer -2): generate_fast with ``compile`` (the
    tower's layers compiled inside its graph, counted) and without give generate's tokens; the compiled
    and the eager tower graphs are kept apart (two captures)."""
    if not can_compile(torch.device("cuda")):
        pytest.skip("torch.compile on CUDA needs Triton")
    model = towered(family, -2)
    model.generation_config.eos_token_id = None
    data = [inputs_for(model, s) for s in (0, 1)]
    model.cuda()
    if method is not None:
        mmsink.wrap(model, prune=method, budget=0.5)
    try:
        for d in data + data[:1]:
            inputs = {k: v.cuda() for k, v in d.items()}
            with torch.no_grad():
                ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
                fast = mmsink.generate_fast(
                    model, max_new_tokens=6, compile=True, tower_compile=True, **inputs
                )
                g = tower_graph(model)
                calls = g.compiled_calls
                assert torch.equal(fast, ref)
                eager = mmsink.generate_fast(model, max_new_tokens=6, compile=False, **inputs)
                assert torch.equal(eager, ref)
                assert g.compiled_calls == calls  # the eager graph runs no compiled layer
        assert g.compiled_calls > 0 and not g.failed
        assert g.captures == 2 and sorted(k[2] for k in g.graphs) == [False, True]
        assert all("forward" not in vars(b) for b in g.encoder.layers)
    finally:
        if method is not None:
            mmsink.unwrap(model)
        store.clear(model)


@pytest.mark.parametrize("method", [None, "visionzip", "fastv"])
def test_cuda_qwen_compiled_blocks_give_generates_tokens(method):
    """Qwen2-VL's tower (not graphed) with its blocks compiled (``compiled_blocks``, around the call as a
    prefill would enter it): generate_fast gives generate's tokens for two prompts, then the first again;
    the blocks went through the compiled function."""
    if not can_compile(torch.device("cuda")):
        pytest.skip("torch.compile on CUDA needs Triton")
    from test_tower_compile import qwen
    from tiny import qwen_batch

    model = qwen(4).cuda()
    data = [qwen_batch([(3, 5, [(8, 8), (4, 8)])], seed=s)[0] for s in (0, 1)]
    if method is not None:
        mmsink.wrap(model, prune=method, budget=0.5)
    try:
        for d in data + data[:1]:
            inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
            with torch.no_grad():
                ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
                with vision_graph.compiled_blocks(model):
                    fast = mmsink.generate_fast(model, max_new_tokens=6, tower_compile=True, **inputs)
            assert torch.equal(fast, ref)
        runner = model.__dict__[vision_graph.BLOCKS]
        assert runner.compiled_calls > 0 and not runner.failed
        assert all("forward" not in vars(b) for b in model.model.visual.blocks)
    finally:
        if method is not None:
            mmsink.unwrap(model)
        store.clear(model)
