"""The decode step's projections as a Triton GEMV for a few rows, with the residual add fused:
``generate_fast(step=StepOptions(fuse=True, gemv=True))``.

    y = linear(x, w, bias=None, residual=None)

x [..., K] with at most ``ROWS`` rows in all, w [N, K] as ``nn.Linear`` keeps it (a row slice of the fused
step's joint tensors: rows contiguous in K, any row stride), bias [N], residual [..., N]:
``y = x @ w.T + bias + residual``, summed in fp32 and rounded once to x's dtype (``h + o_proj(o)``
rounds twice: the fused add can differ from it by one unit of the dtype).

Why by hand: at batch 1 a step's weight reads are its time, and cuBLAS's GEMV kernels read them at ~75-80 %
of the H200's bandwidth, with a split-K reduce kernel after o_proj and down_proj. Here one program per
block of ``BLOCK_N`` output columns reads its [BLOCK_N, K] rows of w once for all the rows of x, in
``BLOCK_K`` steps, and adds bias and residual before its store: one kernel per projection. Two forms of
the inner product: ``dot`` (x's rows padded to 16 as the second operand of ``tl.dot``, whose loads the
compiler pipelines through shared memory; 16-bit dtypes) and the element-wise one (products summed over
K in registers, a sum per row; any dtype, fp32's only). No split-K: with ``BLOCK_N`` 16 the LLaVA-1.5-7B
shapes already give 256 programs or more, and a split without a second kernel needs counts kept between
calls (decode_kernel's lock). ``evals/gemv_speed.py`` times the tunes against cuBLAS.

On CPU (and without Triton) ``linear`` is ``F.linear`` (+ the residual); with ``TRITON_INTERPRET=1`` set
before Triton is imported the kernel runs on CPU tensors (the tests). ``MMSINK_GEMV_KERNEL=0`` turns the
kernel off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear
    triton = None

INTERPRET = kernels.INTERPRET
ROWS = 4  # the most rows of x one program holds (each weight tile is read once for all of them)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available(device) -> bool:
    """Whether the kernel runs on ``device`` (CUDA with Triton, or any under the interpreter);
    ``MMSINK_GEMV_KERNEL=0`` turns it off (``linear`` is then ``F.linear``)."""
    return kernels.available(device, "MMSINK_GEMV_KERNEL")


def reference(x, w, bias=None, residual=None):
    """The kernel's arithmetic in torch: fp32 sums, one rounding to x's dtype."""
    y = torch.matmul(x.float(), w.float().t())
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


def config(m: int, n: int, k: int, dtype) -> dict:
    """The default tune for an [m, k] x [n, k] GEMV: ``block_n``, ``block_k``, ``warps``, ``stages``,
    ``dot``. The fastest of evals/gemv_speed.py's tunes on the H200 at LLaVA-1.5-7B's shapes (1 and 4 rows,
    bf16; evals/results/gemv/): narrow outputs (o, down) want more programs, wide ones (qkv, gate / up,
    lm_head) longer tiles."""
    dot = dtype in (torch.float16, torch.bfloat16)
    if n <= 8192:
        return dict(block_n=16, block_k=256, warps=2, stages=4, dot=dot)
    return dict(block_n=64, block_k=128, warps=4, stages=4, dot=dot)


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, N, sx, sw, sr, sy,
        K: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BIAS: tl.constexpr,
        RES: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr, UP: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        # rows past N read row N - 1 (no mask on the weight loads; their sums are not stored)
        wrow = w_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * sw
        kk = tl.arange(0, BLOCK_K)
        if DOT:  # acc[n, m]: w [BLOCK_N, BLOCK_K] times x's rows as columns [BLOCK_K, 16] (rows >= M zero)
            mi = tl.arange(0, 16)
            acc = tl.zeros([BLOCK_N, 16], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + kk
                xt_ptr = x_ptr + mi[None, :] * sx + k[:, None]
                if EVEN_K:
                    w = tl.load(wrow + k[None, :])
                    xt = tl.load(xt_ptr, mask=mi[None, :] < M, other=0.0)
                else:
                    w = tl.load(wrow + k[None, :], mask=k[None, :] < K, other=0.0)
                    xt = tl.load(xt_ptr, mask=(mi[None, :] < M) & (k[:, None] < K), other=0.0)
                if UP:  # the interpreter's dot multiplies bf16's bits: its operands in fp32 (exact products)
                    acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
                else:
                    acc = tl.dot(w, xt, acc)
            if BIAS:
                acc += tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)[:, None]
            out = (mi[None, :] < M) & nm[:, None]
            if RES:
                acc += tl.load(r_ptr + mi[None, :] * sr + n[:, None], mask=out, other=0.0).to(tl.float32)
            tl.store(y_ptr + mi[None, :] * sy + n[:, None], acc.to(y_ptr.dtype.element_ty), mask=out)
        else:  # one sum per row of x (at most 4), each over the same weight tile
            a0 = tl.zeros([BLOCK_N], tl.float32)
            a1 = tl.zeros([BLOCK_N], tl.float32)
            a2 = tl.zeros([BLOCK_N], tl.float32)
            a3 = tl.zeros([BLOCK_N], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + kk
                if EVEN_K:
                    w = tl.load(wrow + k[None, :]).to(tl.float32)
                else:
                    w = tl.load(wrow + k[None, :], mask=k[None, :] < K, other=0.0).to(tl.float32)
                a0 += _dot_row(w, x_ptr, k, K, EVEN_K)
                if M > 1:
                    a1 += _dot_row(w, x_ptr + sx, k, K, EVEN_K)
                if M > 2:
                    a2 += _dot_row(w, x_ptr + 2 * sx, k, K, EVEN_K)
                if M > 3:
                    a3 += _dot_row(w, x_ptr + 3 * sx, k, K, EVEN_K)
            b = tl.zeros([BLOCK_N], tl.float32)
            if BIAS:
                b = tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)
            _store_row(a0 + b, r_ptr, y_ptr, n, nm, RES)
            if M > 1:
                _store_row(a1 + b, r_ptr + sr, y_ptr + sy, n, nm, RES)
            if M > 2:
                _store_row(a2 + b, r_ptr + 2 * sr, y_ptr + 2 * sy, n, nm, RES)
            if M > 3:
                _store_row(a3 + b, r_ptr + 3 * sr, y_ptr + 3 * sy, n, nm, RES)

    @triton.jit
    def _dot_row(w, row_ptr, k, K, EVEN_K: tl.constexpr):
        """The weight tile [BLOCK_N, BLOCK_K] (fp32) times one row of x at ``k``: [BLOCK_N] fp32."""
        if EVEN_K:
            xr = tl.load(row_ptr + k)
        else:
            xr = tl.load(row_ptr + k, mask=k < K, other=0.0)
        return tl.sum(w * xr.to(tl.float32)[None, :], 1)

    @triton.jit
    def _store_row(a, r_ptr, y_ptr, n, nm, RES: tl.constexpr):
        if RES:
            a += tl.load(r_ptr + n, mask=nm, other=0.0).to(tl.float32)
        tl.store(y_ptr + n, a.to(y_ptr.dtype.element_ty), mask=nm)


def launch(x, w, bias=None, residual=None, block_n=None, block_k=None, warps=None, stages=None, dot=None):
    """The kernel on x's device for x [M, K] (M <= ROWS, rows contiguous in K), w [N, K] (the same), bias
    [N], residual [M, N]; returns y [M, N] in x's dtype. ``block_n`` .. ``dot``: ``config``'s unless
    given (evals/gemv_speed.py tries others)."""
    m, k = x.shape
    n = w.shape[0]
    if not 1 <= m <= ROWS or w.shape[1] != k or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"mmsink: the GEMV kernel takes x [1..{ROWS}, K] and w [N, K], rows contiguous")
    tune = config(m, n, k, x.dtype)
    tune.update({key: v for key, v in dict(block_n=block_n, block_k=block_k, warps=warps, stages=stages,
                                           dot=dot).items() if v is not None})  # fmt: skip
    if tune["dot"] and x.dtype == torch.float32:  # tl.dot would round fp32 to tf32
        raise ValueError("mmsink: the GEMV kernel's dot form takes 16-bit dtypes")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    b = bias if bias is not None else y  # unread
    r = residual if residual is not None else y
    if residual is not None and (residual.shape != (m, n) or residual.stride(1) != 1):
        raise ValueError("mmsink: the GEMV kernel's residual must be [M, N], rows contiguous")
    bn, bk = tune["block_n"], tune["block_k"]
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, w, b, r, y, n, x.stride(0), w.stride(0), r.stride(0), y.stride(0),
        K=k, M=m, BLOCK_N=bn, BLOCK_K=bk, BIAS=bias is not None, RES=residual is not None,
        EVEN_K=k % bk == 0, DOT=tune["dot"],
        UP=INTERPRET and x.dtype == torch.bfloat16, num_warps=tune["warps"], num_stages=tune["stages"],
    )  # fmt: skip
    return y


if triton is not None:

    @torch.library.custom_op("mmsink::gemv", mutates_args=())
    def _gemv_op(
        x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
    ) -> torch.Tensor:
        return launch(x, w, bias, residual)

    @_gemv_op.register_fake
    def _(x, w, bias, residual):
        return x.new_empty(x.shape[0], w.shape[0])


def fits(x, w, bias=None, residual=None) -> bool:
    """Whether ``linear`` runs the kernel for these: ``available`` on x's device, at most ``ROWS`` rows,
    w [N, K] with rows contiguous in K, dtypes alike and one of fp32 / fp16 / bf16, bias [N]."""
    if not available(x.device) or x.dim() < 1 or w.dim() != 2 or x.numel() == 0:
        return False
    if x.numel() // x.shape[-1] > ROWS or w.shape[1] != x.shape[-1] or w.stride(1) != 1:
        return False
    if x.dtype not in DTYPES or w.dtype != x.dtype or w.device != x.device:
        return False
    if bias is not None and (bias.shape != (w.shape[0],) or bias.dtype != x.dtype or bias.stride(0) != 1):
        return False
    return residual is None or (residual.shape == (*x.shape[:-1], w.shape[0]) and residual.dtype == x.dtype)


def linear(x, w, bias=None, residual=None):
    """``F.linear(x, w, bias)`` (+ ``residual``): the kernel where ``fits`` (an opaque op to torch.compile,
    so it stays inside a compiled step and its CUDA graph), else torch's."""
    if not fits(x, w, bias, residual):
        y = F.linear(x, w, bias)
        return y if residual is None else residual + y
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, w.shape[0])
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    return _gemv_op(x2, w, bias, r2).view(*lead, w.shape[0])
