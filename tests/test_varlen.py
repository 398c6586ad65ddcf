"""Padded segments on a variable-length kernel: packing valid slots, causal attention inside each
sample, zeros on padding rows. On CPU the kernel is replaced by a per-sample SDPA loop so that the
packing and unpacking are checked against masked SDPA over the padded batch; the real kernel runs in
tests/test_gpu.py."""

import pytest
import torch
import torch.nn.functional as F

from mmsink.core import varlen
from mmsink.core.attention import allowed_matrix


def per_sample_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1), **kw):
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    out = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        assert e - s <= max_q
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))  # [H, len, D]
        if ks.shape[0] != qs.shape[0]:
            ks = ks.repeat_interleave(qs.shape[0] // ks.shape[0], 0)
            vs = vs.repeat_interleave(qs.shape[0] // vs.shape[0], 0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(out)


def test_pack_and_attention_match_masked_sdpa(monkeypatch):
    monkeypatch.setattr(varlen, "kernel", lambda: (per_sample_kernel, "torch_window", False))
    g = torch.Generator().manual_seed(0)
    b, h, hkv, n, d = 3, 4, 2, 9, 8
    valid = torch.zeros(b, n, dtype=torch.bool)
    for i, real in enumerate((9, 5, 1)):  # left padding, one sample with a single token
        valid[i, n - real :] = True
    q, k, v = (torch.randn(b, x, n, d, generator=g) for x in (h, hkv, hkv))
    meta = varlen.pack(valid)
    assert meta["cu"].tolist() == [0, 9, 14, 15] and meta["max"] == n
    known = varlen.pack(valid, total=15)  # the host's count (no read): the same places
    assert torch.equal(known["flat"], meta["flat"]) and torch.equal(known["cu"], meta["cu"])
    assert meta["flat"].tolist() == [i * n + j for i in range(b) for j in range(n) if valid[i, j]]
    out = varlen.attention(q, k, v, meta, scale=0.3)  # [B, n, H, D]
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed_matrix(valid, n), scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(out[valid], ref[valid])
    assert out[~valid].abs().max() == 0


def flash_attn_stand_in(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
):
    """flash-attn 2's documented ``flash_attn_varlen_func`` signature (grouped kv heads native)."""
    assert causal and dropout_p == 0.0 and k.shape[1] < q.shape[1]  # GQA heads not repeated by the caller
    return per_sample_kernel(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, (-1, 0)
    )


def cute_stand_in(
    q,
    k,
    v,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    seqused_q=None,
    seqused_k=None,
    softmax_scale=None,
    causal=False,
    window_size=(None, None),
    pack_gqa=None,
):
    """flash-attn-4's ``flash_attn.cute.flash_attn_varlen_func`` as transformers calls it: keywords, no
    max lengths, (output, LSE) back, grouped kv heads native."""
    assert causal and k.shape[1] < q.shape[1]
    n = q.shape[0]
    out = per_sample_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, n, n, softmax_scale, (-1, 0))
    return out, torch.zeros(q.shape[1], q.shape[0])


def first_torch_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, enable_gqa=False):
    """The first ``torch.nn.attention.varlen.varlen_attn``: a causal flag, the default scale."""
    assert is_causal
    return per_sample_kernel(q, k, v, cu_q, cu_k, max_q, max_k, None, (-1, 0))


@pytest.mark.parametrize(
    "stand_in,flavour,gqa,scale",
    [
        (flash_attn_stand_in, "flash_attn", True, 0.3),
        (cute_stand_in, "flash_attn_cute", True, 0.3),
        (first_torch_stand_in, "torch_causal", True, 8**-0.5),
        (first_torch_stand_in, "torch_causal", False, 8**-0.5),
    ],
)
def test_every_kernel_flavour_is_called_as_documented(monkeypatch, stand_in, flavour, gqa, scale):
    """The flash_attn package's varlen function and the first torch release are called with their own
    argument conventions (scale keyword or default scale, causal flag, grouped kv heads or repeated)."""
    monkeypatch.setattr(varlen, "kernel", lambda: (stand_in, flavour, gqa))
    g = torch.Generator().manual_seed(1)
    b, h, hkv, n, d = 2, 4, 2, 7, 8
    valid = torch.zeros(b, n, dtype=torch.bool)
    valid[0, 2:], valid[1, 5:] = True, True
    q, k, v = (torch.randn(b, x, n, d, generator=g) for x in (h, hkv, hkv))
    out = varlen.attention(q, k, v, varlen.pack(valid), scale=scale)
    ref = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(2, 1),
        v.repeat_interleave(2, 1),
        attn_mask=allowed_matrix(valid, n),
        scale=scale,
    ).transpose(1, 2)
    torch.testing.assert_close(out[valid], ref[valid])


@pytest.mark.parametrize("method,opts", [("none", {}), ("fastv", {"budget": 6}), ("pdrop", {})])
def test_padded_model_through_the_varlen_path(monkeypatch, method, opts):
    """A padded batch through the wrapped model with the ragged kernel (CPU stand-in): every decoder layer
    of a padded segment calls it with that segment's packing (places found from the host's token count,
    no read), and logits and plan equal the masked path's."""
    from tiny import batch, prompt, tiny_llava

    import mmsink
    from mmsink.tools.reads import DeviceReads

    model = tiny_llava(layers=6)
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(3, 1, seed=3)])
    calls = []

    def kernel_fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(int(cu_q[-1]))
        return per_sample_kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    res = {}
    for on in (False, True):
        with monkeypatch.context() as mp:
            mp.setattr(varlen, "on_device", lambda x: True)
            mp.setattr(varlen, "usable", lambda q, scale: True)
            mp.setattr(varlen, "kernel", lambda: (kernel_fn, "torch_window", False))
            mmsink.wrap(model, prune=method, varlen=on, **opts)
            with torch.no_grad(), DeviceReads() as reads:
                logits = model(**inputs, logits_to_keep=1).logits[:, -1]
            stats = mmsink.stats(model)
            assert not [
                s for s in reads.sites if s.split(":")[0].endswith("mmsink/varlen.py")
            ]  # packing reads nothing
            mmsink.unwrap(model)
        res[on] = (logits, stats.kept_indices, stats.tokens_per_layer)
    assert len(calls) == 6  # one call per layer, none with varlen off
    real = inputs["attention_mask"].sum().item()
    assert calls[0] == real  # the first segment packs every real token
    torch.testing.assert_close(res[True][0], res[False][0], atol=1e-5, rtol=1e-5)
    assert res[True][1:] == res[False][1:]


@pytest.mark.parametrize("method,opts", [("none", {}), ("fastv", {"budget": 6})])
def test_padded_batch_with_the_ragged_kernel_still_hands_off(monkeypatch, method, opts):
    """A directive that only asks for the ragged kernel leaves the layer's attention plain: generate_fast's
    prefill of a padded batch still hands off where the plan is final (the tail masks its own padding), so
    the layers after it run in the tail (the graph on a GPU) and not through the model's forward; generate's
    tokens."""
    from tiny import batch, prompt, tiny_llava

    import mmsink

    model = tiny_llava(layers=6)
    model.generation_config.eos_token_id = None
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(3, 1, seed=3)])
    monkeypatch.setattr(varlen, "on_device", lambda x: True)
    monkeypatch.setattr(varlen, "usable", lambda q, scale: True)
    monkeypatch.setattr(varlen, "kernel", lambda: (per_sample_kernel, "torch_window", False))
    ran = []  # layers called through the model's forward (their hooks run); the tail calls them bare
    layers = model.model.language_model.layers
    counts = [m.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, m in enumerate(layers)]
    mmsink.wrap(model, prune=method, varlen=True, **opts)  # (its hooks after these: the hand-off's too)
    try:
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        ran.clear()
        out = mmsink.generate_fast(model, max_new_tokens=4, **inputs)
        last = ran[-1]
    finally:
        for c in counts:
            c.remove()
        mmsink.unwrap(model)
    assert torch.equal(out, ref)
    assert ran == list(range(last + 1)) and last < len(layers) - 1, ran
    if method == "none":
        assert ran == [0]
