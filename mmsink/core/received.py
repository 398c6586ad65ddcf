"""The attention each key receives, summed over the queries, as two Triton kernels: VisionZip's scores on
Qwen2-VL's tower (``patches/qwen2_vl.py``, ``Family.received``).

    sums = column_sums(q, k, scale)

q [H, C, hd], k [H, P, hd] (any strides but the last): per head, the softmax over the P keys of each query
row's ``q k^T * scale``, summed over the C rows: [H, P] fp32. Scores, exponentials and sums in fp32.

Why by hand: torch's path materialises the [H, C, P] fp32 logits (in chunks of query rows): a GEMM writes
them, a scale, a softmax and a sum each read them again, memory traffic far beyond the arithmetic of
``q k^T``. Here nothing of that size is written. Pass 1 (``_lse_kernel``, one program per head and block of
``BLOCK_M`` query rows): each row's log-sum-exp over all P keys, streamed over key blocks with a running
max (base 2: ``scale * log2(e)`` folded into the scores, the same value). Pass 2 (``_sums_kernel``, one
program per head and block of ``BLOCK_N`` keys): the scores again, ``exp2(s - lse)`` of every query block
added up element-wise in fp32 registers, summed over the rows once at the end. Each pass computes
``q k^T`` with ``tl.dot`` on the 16-bit operands (products exact in fp32, fp32 accumulation); a head dim
that is not a power of two (Qwen2-VL's 80) is split into two power-of-two parts (64 + 16) rather than
padded to the next one. fp32 inputs are refused (``tl.dot`` would round them to tf32): ``column_sums``
then takes torch's path.

On CPU (and without Triton) ``column_sums`` is ``reference`` in chunks of query rows; with
``TRITON_INTERPRET=1`` set before Triton is imported the kernels run on CPU tensors (the tests).
``MMSINK_RECEIVED_KERNEL=0`` turns them off.
"""

from __future__ import annotations

import math

import torch

from . import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path
    triton = None

INTERPRET = kernels.INTERPRET
DTYPES = (torch.float16, torch.bfloat16)
CHUNK = 1024  # query rows per step of the torch path


def available(device) -> bool:
    """Whether the kernels run on ``device`` (CUDA with Triton, or any under the interpreter);
    ``MMSINK_RECEIVED_KERNEL=0`` turns them off (``column_sums`` then takes torch's path)."""
    return kernels.available(device, "MMSINK_RECEIVED_KERNEL")


def reference(q, k, scale: float) -> torch.Tensor:
    """[H, P] fp32: the softmax rows of ``q k^T * scale`` in fp32, summed over the queries."""
    return torch.softmax(q.float() @ k.float().transpose(1, 2) * scale, -1).sum(1)


def config(c: int, p: int, hd: int, dtype) -> dict:
    """The default tune: ``block_m`` / ``block_n`` (query rows / keys per tile), ``warps``, ``stages``;
    the fastest of evals/received_speed.py's tunes on an H200 at 2,500 and 10,000 patches
    (evals/results/received)."""
    return dict(block_m=64, block_n=64, warps=4, stages=3)


def split(hd: int) -> tuple[int, int]:
    """The head dim as two power-of-two parts for ``tl.dot`` (at least 16 each; the second 0 where one
    part covers it): 80 -> (64, 16), 64 -> (64, 0), 100 -> (64, 64)."""
    d0 = max(16, 1 << (max(hd, 1).bit_length() - 1))
    return d0, (kernels.pow2(hd - d0, 16) if hd > d0 else 0)


if triton is not None:

    @triton.jit
    def _rows(base, rows, ok, stride, HD: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
        """Rows ``rows`` of one head [R, hd] as the two parts of the head dim (zeros past hd and past the
        valid rows); the second is the first again where D1 is 0 (unused)."""
        at = base + rows.to(tl.int64)[:, None] * stride
        d0 = tl.arange(0, D0)
        a = tl.load(at + d0[None, :], mask=ok[:, None] & (d0[None, :] < HD), other=0.0)
        b = a
        if D1 > 0:
            d1 = D0 + tl.arange(0, D1)
            b = tl.load(at + d1[None, :], mask=ok[:, None] & (d1[None, :] < HD), other=0.0)
        return a, b

    @triton.jit
    def _cols(base, cols, ok, stride, HD: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
        """Rows ``cols`` of one head's keys transposed: [hd, N] as the two parts of the head dim."""
        at = base + cols.to(tl.int64)[None, :] * stride
        d0 = tl.arange(0, D0)
        a = tl.load(at + d0[:, None], mask=ok[None, :] & (d0[:, None] < HD), other=0.0)
        b = a
        if D1 > 0:
            d1 = D0 + tl.arange(0, D1)
            b = tl.load(at + d1[:, None], mask=ok[None, :] & (d1[:, None] < HD), other=0.0)
        return a, b

    @triton.jit
    def _scores(qa, qb, ka, kb, D1: tl.constexpr, UP: tl.constexpr):
        """q k^T [M, N] in fp32 from the two parts of each (``UP``: the interpreter's dot multiplies the
        16-bit types' bits, so its operands go to fp32 first, where the products are exact)."""
        if UP:
            s = tl.dot(qa.to(tl.float32), ka.to(tl.float32))
            if D1 > 0:
                s = tl.dot(qb.to(tl.float32), kb.to(tl.float32), s)
        else:
            s = tl.dot(qa, ka)
            if D1 > 0:
                s = tl.dot(qb, kb, s)
        return s

    @triton.jit
    def _lse_kernel(
        q_ptr, k_ptr, lse_ptr, C, P, sqh, sqc, skh, skp, qk_scale,
        HD: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        UP: tl.constexpr,
    ):  # fmt: skip
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rok = rows < C
        qa, qb = _rows(q_ptr + h.to(tl.int64) * sqh, rows, rok, sqc, HD, D0, D1)
        kh = k_ptr + h.to(tl.int64) * skh
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, P, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cok = cols < P
            ka, kb = _cols(kh, cols, cok, skp, HD, D0, D1)
            s = _scores(qa, qb, ka, kb, D1, UP) * qk_scale
            s = tl.where(cok[None, :], s, float("-inf"))
            top = tl.maximum(m, tl.max(s, 1))  # finite: every block has a key
            total = total * tl.exp2(m - top) + tl.sum(tl.exp2(s - top[:, None]), 1)
            m = top
        tl.store(lse_ptr + h.to(tl.int64) * C + rows, m + tl.log2(total), mask=rok)

    @triton.jit
    def _sums_kernel(
        q_ptr, k_ptr, lse_ptr, out_ptr, C, P, sqh, sqc, skh, skp, qk_scale,
        HD: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        UP: tl.constexpr,
    ):  # fmt: skip
        h = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cok = cols < P
        ka, kb = _cols(k_ptr + h.to(tl.int64) * skh, cols, cok, skp, HD, D0, D1)
        qh = q_ptr + h.to(tl.int64) * sqh
        lh = lse_ptr + h.to(tl.int64) * C
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # one sum per row slot: no reduction per block
        for m0 in range(0, C, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rok = rows < C
            qa, qb = _rows(qh, rows, rok, sqc, HD, D0, D1)
            lse = tl.load(lh + rows, mask=rok, other=float("inf"))  # rows past C: exp2(-inf) = 0
            acc += tl.exp2(_scores(qa, qb, ka, kb, D1, UP) * qk_scale - lse[:, None])
        tl.store(out_ptr + h.to(tl.int64) * P + cols, tl.sum(acc, 0), mask=cok)


def launch(q, k, scale: float, block_m=None, block_n=None, warps=None, stages=None):
    """Both kernels on q's device for q [H, C, hd], k [H, P, hd] (16-bit, one dtype, the head dim
    contiguous); returns the [H, P] fp32 sums. ``block_m`` .. ``stages``: ``config``'s unless given
    (evals/received_speed.py tries others)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError("mmsink: the received-attention kernels take q [H, C, hd] and k [H, P, hd]")
    if q.dtype not in DTYPES or k.dtype != q.dtype or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("mmsink: the received-attention kernels take fp16 / bf16, the head dim contiguous")
    h, c, hd = q.shape
    p = k.shape[1]
    out = torch.empty(h, p, device=q.device, dtype=torch.float32)
    if c == 0 or p == 0 or h == 0:
        return out.zero_()
    tune = config(c, p, hd, q.dtype)
    given = dict(block_m=block_m, block_n=block_n, warps=warps, stages=stages)
    tune.update({key: v for key, v in given.items() if v is not None})
    bm, bn = tune["block_m"], tune["block_n"]
    d0, d1 = split(hd)
    lse = torch.empty(h, c, device=q.device, dtype=torch.float32)
    args = (c, p, q.stride(0), q.stride(1), k.stride(0), k.stride(1), float(scale) * math.log2(math.e))
    consts = dict(HD=hd, D0=d0, D1=d1, BLOCK_M=bm, BLOCK_N=bn, UP=INTERPRET)
    run = dict(num_warps=tune["warps"], num_stages=tune["stages"])
    _lse_kernel[(triton.cdiv(c, bm), h)](q, k, lse, *args, **consts, **run)
    _sums_kernel[(triton.cdiv(p, bn), h)](q, k, lse, out, *args, **consts, **run)
    return out


def fits(q, k) -> bool:
    """Whether ``column_sums`` runs the kernels for these: ``available`` on q's device, q [H, C, hd] and
    k [H, P, hd] alike in heads, head dim, device and a 16-bit dtype, the head dim contiguous."""
    if triton is None or not available(q.device) or q.dim() != 3 or k.dim() != 3:
        return False
    if q.dtype not in DTYPES or k.dtype != q.dtype or k.device != q.device:
        return False
    return q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2] and q.stride(2) == 1 and k.stride(2) == 1


def column_sums(q, k, scale: float, chunk: int = CHUNK, sums=reference) -> torch.Tensor:
    """[H, P] fp32: per head, the softmax rows of ``q`` [H, C, hd] against ``k`` [H, P, hd] summed over the
    C queries. The kernels where ``fits``, else ``sums`` (``reference``'s arguments and result; Qwen's
    family passes its GEMM with fp32 output) over ``chunk`` query rows at a time."""
    if fits(q, k):
        return launch(q, k, scale)
    k = k.contiguous()
    out = torch.zeros(k.shape[0], k.shape[1], device=k.device)
    for c in range(0, q.shape[1], chunk):
        out += sums(q[:, c : c + chunk].contiguous(), k, scale)
    return out
