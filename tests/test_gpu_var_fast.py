"""On a GPU: ``generate_fast`` with VAR hands the prefill off (before layer 0 alone, after FastV's layer
K with it) and runs the remaining layers as one captured CUDA graph of compiled ``layer_prefill`` steps,
VAR's key codes and edit compiled into its layers' steps: generate's tokens (its prefill with VAR
compiled, CUDA's default, or eager) and prefill stats (fp32, so kernels' rounding cannot part them),
whole batch and prefill_batch chunks, the tail captured and then replayed. tests/test_fast_var.py checks
the same on the CPU. Skipped without CUDA."""

import pytest
import torch
from test_var import VAR
from tiny import batch, prompt, tiny_llava

import mmsink
from mmsink.core.hooks import get_handle
from mmsink.fast import decode as fastmod

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("var_compile", [None, False])  # None: CUDA's default, compiled
@pytest.mark.parametrize("method,opts,first", [(None, {}, 0), ("fastv", {"budget": 9}, 2)])
def test_cuda_var_generate_fast_equals_generate(monkeypatch, method, opts, first, var_compile):
    tails = []
    real = fastmod.FastDecoder.run_tail
    monkeypatch.setattr(
        fastmod.FastDecoder, "run_tail", lambda self, *a, **k: tails.append(a[0]) or real(self, *a, **k)
    )
    model = tiny_llava().cuda()
    model.generation_config.eos_token_id = None
    prompts = [prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(3, 9, seed=3)]
    inputs = {k: v.cuda() for k, v in batch(prompts).items()}
    mmsink.wrap(model, prune=method, var={**VAR, "compile": var_compile}, **opts)
    try:
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        want = mmsink.stats(model)
        for size in (None, 2):
            for _ in range(3):  # the tail eager, captured, replayed
                got = mmsink.generate_fast(
                    model,
                    max_new_tokens=10,
                    graphs=True,
                    compile=True,
                    prefill_batch=size,
                    var_handoff=True,
                    **inputs,
                )
                assert torch.equal(got, ref), size
                if size is None:
                    assert mmsink.stats(model) == want
        decs = model.__dict__[fastmod.STORE].values()
        assert sum(len(d.tails) for d in decs) == 1  # the whole batch's (chunks run their tails eagerly)
        fn = get_handle(model).var_compiled.prefill_edit
        assert (fn.compiled is not None and not fn.failed) == (var_compile is None)
    finally:
        mmsink.unwrap(model)
    assert tails == [first] * (3 + 3 * 2)
