"""wrap / disabled / unwrap leave the model's behaviour exactly as it was."""

import pytest
import torch
from tiny import batch, prompt, tiny_llava

import mmsink


@pytest.fixture(scope="module")
def inputs():
    return batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(4, 9, seed=3)], seed=4)


def hook_counts(model):
    return [(len(mod._forward_hooks), len(mod._forward_pre_hooks)) for mod in model.modules()]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_method_is_bitwise_identical(inputs, attn):
    m = tiny_llava(attn=attn)
    ref = logits(m, inputs)
    mmsink.wrap(m, prune=None)
    assert torch.equal(logits(m, inputs), ref)
    with torch.no_grad():
        g_ref = m.generate(**inputs, max_new_tokens=4, do_sample=False)
    mmsink.unwrap(m)
    with torch.no_grad():
        assert torch.equal(m.generate(**inputs, max_new_tokens=4, do_sample=False), g_ref)


def test_disabled_and_unwrap_restore_exactly(inputs):
    m = tiny_llava()
    ref = logits(m, inputs)
    before = hook_counts(m)
    mmsink.wrap(m, prune="fastv", budget=6)
    pruned = logits(m, inputs)
    assert not torch.allclose(pruned[:, -1], ref[:, -1])  # pruning changed something
    with mmsink.disabled(m):
        assert torch.equal(logits(m, inputs), ref)
    assert torch.equal(logits(m, inputs), pruned)  # back on after the block
    mmsink.unwrap(m)
    assert torch.equal(logits(m, inputs), ref)
    assert "_mmsink" not in m.__dict__ and "generate" not in m.__dict__
    assert m.config.text_config._attn_implementation == "sdpa"
    assert hook_counts(m) == before
    with pytest.raises(ValueError, match="not wrapped"):
        mmsink.stats(m)


def test_rewrap_replaces_settings(inputs):
    m = tiny_llava()
    mmsink.wrap(m, prune="fastv", budget=6)
    logits(m, inputs)
    assert mmsink.stats(m).kept_tokens[-1] == [6, 6, 6]
    mmsink.wrap(m, prune="fastv", budget=12)
    logits(m, inputs)
    assert mmsink.stats(m).kept_tokens[-1] == [12, 12, 12]
    n_hooks = sum(len(mod._forward_pre_hooks) for mod in m.modules())
    mmsink.unwrap(m)
    bare = sum(len(mod._forward_pre_hooks) for mod in m.modules())
    assert n_hooks - bare == 1 + len(m.model.language_model.layers)  # one set, not two


def test_refused_rewrap_keeps_the_previous_wrap(inputs):
    m = tiny_llava()
    mmsink.wrap(m, prune="fastv", budget=6)
    n_hooks = sum(len(mod._forward_pre_hooks) for mod in m.modules())
    with pytest.raises(ValueError, match="larger than"):
        mmsink.wrap(m, prune="fastv", budget=1000)  # refused by the handle, after the old one came off
    with pytest.raises(ValueError, match="sink_dims"):
        mmsink.wrap(m, prune="fastv", budget=6, var=True)
    assert sum(len(mod._forward_pre_hooks) for mod in m.modules()) == n_hooks
    logits(m, inputs)
    assert mmsink.stats(m).kept_tokens[-1] == [6, 6, 6]


def test_keep_everything_plan_matches_baseline(inputs):
    """fastv with budget = all tokens re-packs and builds its own masks, and must change nothing."""
    for attn in ("sdpa", "eager"):
        m = tiny_llava(attn=attn)
        ref = logits(m, inputs)
        mmsink.wrap(m, prune="fastv", budget=1.0)
        out = logits(m, inputs)
        assert mmsink.stats(m).tokens_per_layer[2] == ref.shape[1]
        valid = inputs["attention_mask"].bool()
        torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_text_only_prompt_passes_through(inputs):
    m = tiny_llava()
    text = {"input_ids": torch.randint(3, 90, (2, 11)), "attention_mask": torch.ones(2, 11, dtype=torch.long)}
    ref = logits(m, text)
    mmsink.wrap(m, prune="visipruner", budget=4)
    assert torch.equal(logits(m, text), ref)
    assert mmsink.stats(m).kept_tokens[0] == [0, 0]


def test_two_models_side_by_side(inputs):
    a, b = tiny_llava(seed=0), tiny_llava(seed=0)
    ref = logits(b, inputs)
    mmsink.wrap(a, prune="pdrop")
    pa = logits(a, inputs)
    assert torch.equal(logits(b, inputs), ref)  # the unwrapped twin is untouched
    assert not torch.allclose(pa[:, -1], ref[:, -1])
    assert b.config.text_config._attn_implementation == "sdpa"


def test_dense_segments_pass_no_mask():
    """A pruned segment without padding leaves the mask to the kernel's causal path (SDPA stays on its
    flash kernel); with left padding it passes an explicit mask. Outputs agree either way."""
    from tiny import batch, prompt

    m = tiny_llava()
    seen = []
    one = batch([prompt(5, 7, seed=1)])
    two = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    mmsink.wrap(m, prune="fastv", budget=6)
    # registered after wrap, so it runs after the handle's hook and sees what the layer gets
    hook = m.model.language_model.layers[5].register_forward_pre_hook(
        lambda mod, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True
    )
    with torch.no_grad():
        a = m(**one).logits[0, -1]
        b = m(**two).logits[0, -1]
    hook.remove()
    assert seen[0] is None and seen[1] is not None
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_plan_moves_whole_to_another_device():
    """What the multi-GPU path relies on (tests/test_multigpu.py runs it on two GPUs): ``Prefill.to``
    reaches every tensor of a plan, segments stay shared objects, and the cache is left alone."""
    from tiny import batch, prompt

    from mmsink.core.plan import Prefill

    m = tiny_llava()
    mmsink.wrap(m, prune="visipruner", budget=5, sink_forward={"factor": 1.01, "max_sinks": 2})
    handle = mmsink.api.get_handle(m)
    grabbed = []
    hook = m.model.language_model.layers[6].register_forward_hook(
        lambda mod, a, o: grabbed.append((handle.ctx, handle.ctx.cache))
    )
    with torch.no_grad():
        m(**batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)]))
    hook.remove()
    ctx, cache = grabbed[0]
    assert isinstance(ctx, Prefill) and len(ctx.segments) > 1
    ctx.cache = cache  # dropped once the forward ended; put back to check that it is left alone
    seg = ctx.segments[-1]
    ctx.to("meta")
    seen, stack = set(), [(k, v) for k, v in vars(ctx).items() if k not in ("cache", "kwargs")]
    while stack:
        name, x = stack.pop()
        if isinstance(x, torch.Tensor):
            assert x.device.type == "meta", name
        elif isinstance(x, (list, tuple)):
            stack += [(name, v) for v in x]
        elif isinstance(x, dict):
            stack += [(f"{name}.{k}", v) for k, v in x.items()]
        elif type(x).__module__.startswith("mmsink") and id(x) not in seen:
            seen.add(id(x))
            stack += [(f"{name}.{k}", v) for k, v in vars(x).items()]
    assert ctx.seg is seg and ctx.cache is cache
    assert all(layer.keys.device.type == "cpu" for layer in cache.layers)


def test_stats_are_built_on_request_and_hold_no_cache(inputs):
    """Stats are built when asked for, yet describe the last prefill, and keep neither its KV cache nor
    its inputs alive in the meantime."""
    import gc
    import weakref

    m = tiny_llava()
    mmsink.wrap(m, prune="fastv", budget=6)
    with torch.no_grad():
        out = m(**inputs, use_cache=True)
    cache = weakref.ref(out.past_key_values)
    del out
    gc.collect()
    assert cache() is None
    assert mmsink.stats(m).kept_tokens[-1] == [6, 6, 6]
    assert mmsink.stats(m) is mmsink.stats(m)  # built once
