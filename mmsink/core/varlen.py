"""Ragged attention for padded segments: the valid tokens of every sample packed into one sequence and
run through a variable-length FlashAttention kernel (``torch.nn.attention.varlen``, or flash-attn-4 /
flash-attn 2 when installed) instead of SDPA with a padding mask, which keeps SDPA off its flash kernel.

Used for prefill layers whose segment has padding (left-padded prompts, or samples that kept different
numbers of tokens); CUDA only, fp16 / bf16; ``mmsink.wrap(..., varlen=False)`` turns it off.
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def kernel():
    """(function, flavour, takes grouped kv heads) of the varlen kernel this install has, or None. The
    signature is read once here, not per call."""
    try:
        from transformers.utils import is_flash_attn_4_available

        if is_flash_attn_4_available():  # flash-attn-4 (CuTe DSL; Hopper / Blackwell), when installed
            from flash_attn.cute import flash_attn_varlen_func

            return flash_attn_varlen_func, "flash_attn_cute", True
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func  # flash-attn 2, when installed

        return flash_attn_varlen_func, "flash_attn", True
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    flavour = "torch_window" if "window_size" in params else "torch_causal"
    return varlen_attn, flavour, "enable_gqa" in params


def on_device(x: torch.Tensor) -> bool:
    """The kernels are CUDA ones (a seam the CPU tests replace)."""
    return x.is_cuda


@functools.cache
def keywords(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def usable(q: torch.Tensor, scale: float) -> bool:
    """This call can run varlen: CUDA, half precision, a kernel, and a scale the kernel accepts."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)) or kernel() is None:
        return False
    return kernel()[1] != "torch_causal" or abs(scale - q.shape[-1] ** -0.5) < 1e-12


def pack(valid: torch.Tensor, total: int | None = None) -> dict:
    """Where the valid slots of ``valid`` [B, n] sit in the flattened [B * n] layout, and the cumulative
    lengths. ``total``: the number of valid slots when the host knows it (else one device read)."""
    b, n = valid.shape
    if total is None:
        flat = valid.reshape(-1).nonzero().squeeze(1)
    else:  # a stable sort puts the valid slots first, in order: no read
        flat = (~valid).reshape(-1).to(torch.uint8).argsort(stable=True)[:total]
    lens = valid.sum(1, dtype=torch.int32)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=valid.device)
    cu[1:] = lens.cumsum(0)
    return {"flat": flat, "cu": cu, "max": n}


def attention(q, k, v, meta: dict, scale: float) -> torch.Tensor:
    """q [B, H, n, D], k / v [B, Hkv, n, D] (slots in position order, padding on the left) -> output
    [B, n, H, D] (zeros on padding rows), causal within each sample's valid tokens."""
    fn, flavour, gqa = kernel()
    b, h, n, d = q.shape
    hkv = k.shape[1]
    flat, cu, m = meta["flat"], meta["cu"], meta["max"]
    qp = q.transpose(1, 2).reshape(b * n, h, d).index_select(0, flat)
    kp = k.transpose(1, 2).reshape(b * n, hkv, d).index_select(0, flat)
    vp = v.transpose(1, 2).reshape(b * n, hkv, d).index_select(0, flat)
    if flavour == "flash_attn":  # grouped heads natively
        out = fn(qp, kp, vp, cu, cu, m, m, softmax_scale=scale, causal=True)
    elif flavour == "flash_attn_cute":  # keywords; the max lengths only where this release takes them
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, softmax_scale=scale, causal=True)
        kw.update({k: m for k in ("max_seqlen_q", "max_seqlen_k") if k in keywords(fn)})
        out = fn(qp, kp, vp, **kw)
        out = out[0] if isinstance(out, tuple) else out  # (output, LSE)
    else:
        extra = {}
        if hkv != h and gqa:
            extra["enable_gqa"] = True
        elif hkv != h:
            kp, vp = kp.repeat_interleave(h // hkv, 1), vp.repeat_interleave(h // hkv, 1)
        if flavour == "torch_window":
            out = fn(qp, kp, vp, cu, cu, m, m, scale=scale, window_size=(-1, 0), **extra)
        else:  # the first torch releases: a causal flag and the default scale (``usable`` checked it)
            out = fn(qp, kp, vp, cu, cu, m, m, is_causal=True, **extra)
    full = q.new_zeros(b * n, h, d)
    full.index_copy_(0, flat, out)
    return full.view(b, n, h, d)
