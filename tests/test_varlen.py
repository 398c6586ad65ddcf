"""Padded segments on a variable-length kernel: packing valid slots, causal attention inside each
sample, zeros on padding rows. On CPU the kernel is replaced by a per-sample SDPA loop so that the
packing and unpacking are checked against masked SDPA over the padded batch; the real kernel runs in
tests/test_gpu.py."""

import torch
import torch.nn.functional as F

from mmsink import varlen
from mmsink.attention import allowed_matrix


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
    assert meta["flat"].tolist() == [i * n + j for i in range(b) for j in range(n) if valid[i, j]]
    out = varlen.attention(q, k, v, meta, scale=0.3)  # [B, n, H, D]
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed_matrix(valid, n), scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(out[valid], ref[valid])
    assert out[~valid].abs().max() == 0
