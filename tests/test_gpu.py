"""GPU paths (skipped without CUDA): fused LSE attention against plain matmuls, and pruned decoding on
CUDA giving the same tokens cached and uncached."""

import pytest
import torch
from tiny import batch, next_batch, prompt, tiny_llava, tiny_llava_next

import mmsink
from mmsink.core.attention import attention_lse, attention_lse_math

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
    "method,opts",
    [("bare", {}), (None, {}), ("fastv", {"budget": 6}), ("pdrop", {}), ("visipruner", {})],
)
def test_cuda_graph_decode_equals_generate(method, opts):
    """generate_fast with the decode step captured as a CUDA graph gives greedy generate's tokens ("bare":
    the unwrapped model, its prompt through a handle of the call, all layers in the graphed tail)."""
    model = tiny_llava().cuda()
    inputs = {k: v.cuda() for k, v in batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)]).items()}
    if method != "bare":
        mmsink.wrap(model, prune=method, **opts)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    for _ in range(3):  # the prefill tail: eager, then captured, then replayed
        assert torch.equal(mmsink.generate_fast(model, max_new_tokens=12, graphs=True, **inputs), ref)
    assert torch.equal(mmsink.generate_fast(model, max_new_tokens=12, graphs=False, **inputs), ref)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize(
    "method,opts", [(None, {}), ("visionzip", {"budget": 0.5}), ("fastv", {"budget": 6})]
)
def test_cuda_graphed_vision_tower_equals_generate(family, method, opts):
    """generate_fast replays the vision tower as a CUDA graph (captured once, VisionZip's taps fed after
    each replay): two inputs of one shape each give greedy generate's tokens."""
    model = (tiny_llava() if family == "llava" else tiny_llava_next()).cuda()
    if family == "llava":
        data = [batch([prompt(5, 7, seed=1)], seed=s) for s in (0, 1)]
    else:
        data = [next_batch(model.cpu(), [(3, 5, [(40, 56)])], seed=s)[0] for s in (0, 1)]
        model.cuda()
    mmsink.wrap(model, prune=method, **opts)
    for d in data:
        inputs = {k: v.cuda() for k, v in d.items()}
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(mmsink.generate_fast(model, max_new_tokens=8, **inputs), ref)
    (tower,) = model.__dict__["_mmsink_vision_graphs"].values()
    assert tower.captures == 1
    assert "forward" not in model.model.vision_tower.__dict__


@pytest.mark.parametrize("method,opts", [("none", {}), ("fastv", {"budget": 6}), ("pdrop", {})])
def test_varlen_padded_segments_bf16(method, opts):
    """Left-padded prompts in bf16: with the ragged kernel every decoder layer runs one variable-length
    flash call instead of masked SDPA, and the logits and the plan match the masked path."""
    from torch.profiler import ProfilerActivity, profile

    from mmsink.core import varlen

    if varlen.kernel() is None:
        pytest.skip("no varlen kernel in this torch")
    model = tiny_llava().cuda().to(torch.bfloat16)
    prompts = [prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(3, 1, seed=3)]
    inputs = {k: v.cuda() for k, v in batch(prompts).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    res = {}
    for on in (False, True):
        mmsink.wrap(model, prune=method, varlen=on, **opts)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()
        calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_flash_attention_forward")
        res[on] = (logits, calls, mmsink.stats(model).kept_tokens)
    mmsink.unwrap(model)
    layers = model.config.text_config.num_hidden_layers
    assert res[True][1] - res[False][1] == layers
    assert res[True][2] == res[False][2]
    torch.testing.assert_close(res[True][0], res[False][0], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_var_decode_equals_generate(graphs):
    """VAR's decode step on CUDA (eager, and inside a CUDA graph when asked): generate's tokens."""
    from test_var import VAR

    model = tiny_llava().cuda()
    inputs = {k: v.cuda() for k, v in batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)]).items()}
    mmsink.wrap(model, prune="fastv", budget=6, var=VAR)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(mmsink.generate_fast(model, max_new_tokens=10, graphs=graphs, **inputs), ref)


def reads_plain_and_wrapped(model, inputs, where: str) -> tuple:
    """Reads of device values at sites whose path contains ``where``, in one forward of the bare model and
    one of the model wrapped without a method; with both logits."""
    from mmsink.tools.reads import DeviceReads

    def run():
        with torch.no_grad(), DeviceReads(device_only=True) as r:
            logits = model(**inputs).logits
        return sum(c for s, c in r.sites.items() if where in s), logits

    plain, ref = run()
    mmsink.wrap(model, prune="none")
    try:
        ours, logits = run()
    finally:
        mmsink.unwrap(model)
    return plain, ours, ref, logits


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_cuda_qwen_vision_tower_reads_its_grid_once(kind):
    """On CUDA the wrapped Qwen model's vision blocks take host-computed bounds: the reads of device values
    inside transformers' Qwen modeling code fall by at least one per vision block, the logits unchanged."""
    from tiny import qwen_batch, tiny_qwen

    model = tiny_qwen(kind).cuda()
    data, _ = qwen_batch([(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)])], seed=1)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    plain, ours, ref, logits = reads_plain_and_wrapped(model, inputs, "/models/qwen2")
    assert ours <= plain - len(model.model.visual.blocks)
    torch.testing.assert_close(logits, ref)


def test_cuda_next_image_sizes_read_on_the_host():
    """On CUDA the wrapped LLaVA-NeXT model hands transformers its ``image_sizes`` on the host (one read at
    the start): the reads of device values in transformers' NeXT code drop to none, logits unchanged."""
    model = tiny_llava_next().cuda()
    data, _ = next_batch(model.cpu(), [(3, 5, [(40, 56)]), (2, 4, [(56, 40)])], seed=1)
    model.cuda()
    inputs = {k: v.cuda() for k, v in data.items()}
    plain, ours, ref, logits = reads_plain_and_wrapped(model, inputs, "modeling_llava_next")
    assert plain > 0 and ours == 0
    torch.testing.assert_close(logits, ref)


def forced_logits(model, inputs, forced, fast: bool) -> torch.Tensor:
    """Per-step logits [steps, B, V] (fp32) of greedy decoding under teacher forcing: a hook on lm_head
    records each step's logits and hands back logits whose argmax is the forced token, so both paths
    (generate, eager generate_fast with its compiled layer step) are fed the same tokens."""
    seen = []

    def hook(module, args, out):
        seen.append(out[:, -1].float().clone())
        forced_out = torch.full_like(out, -1e4)
        forced_out[:, -1].scatter_(-1, forced[:, len(seen) - 1 : len(seen)], 0.0)
        return forced_out

    n = forced.shape[1]
    handle = model.lm_head.register_forward_hook(hook)
    try:
        with torch.no_grad():
            if fast:
                out = mmsink.generate_fast(model, max_new_tokens=n, graphs=False, **inputs)
            else:
                out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    finally:
        handle.remove()
    assert torch.equal(out[:, -n:], forced) and len(seen) == n
    return torch.stack(seen)


@pytest.mark.parametrize("method,opts", [(None, {}), ("fastv", {"budget": 6})])
def test_bf16_generate_fast_logits_match_generate_under_teacher_forcing(method, opts):
    """bf16: generate_fast's and generate's per-step logits for the same forced tokens (24 steps, a
    left-padded batch of 2). Bound: each differs from the fp32 logits of the same (bf16-rounded) weights
    by bf16 rounding in a different kernel order, so |fast - generate| <= |fast - fp32| + |generate -
    fp32|; we require generate_fast's own error to be at most 2x generate's (max over steps and samples)
    and the two paths to differ by at most 3x generate's error. Greedy tokens can still differ where
    generate's own top-2 gap is below that error (near-ties)."""
    model = tiny_llava().cuda().to(torch.bfloat16).float()  # fp32 holding bf16-representable weights
    inputs = {k: v.cuda() for k, v in batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)]).items()}
    forced = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    mmsink.wrap(model, prune=method, **opts)
    ref = forced_logits(model, inputs, forced, fast=False)
    model.to(torch.bfloat16)
    mmsink.wrap(model, prune=method, **opts)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    gen = forced_logits(model, inputs, forced, fast=False)
    fast = forced_logits(model, inputs, forced, fast=True)
    err_gen = (gen - ref).abs().max().item()
    err_fast = (fast - ref).abs().max().item()
    assert 0 < err_gen < 0.05 * ref.abs().max().item()  # bf16 arithmetic, not a broken path
    assert err_fast <= 2 * err_gen, (err_fast, err_gen)
    assert (fast - gen).abs().max().item() <= 3 * err_gen
