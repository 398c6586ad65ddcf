"""W8A8 linears for the tower timing (issue 18): per-token dynamic int8 activations, per-channel int8 weights.

Three forms of the same scheme, so that a timing can tell where the time goes:

- ``eager``: plain torch ops around ``torch._int_mm`` (quantize: abs, amax, div, round, clamp, cast; rescale:
  cast, two muls, cast, bias): about 15 kernels a linear, each a full pass over the activations;
- ``fused``: one Triton kernel quantizes a row (amax + scale + round + cast), ``torch._int_mm`` multiplies,
  one Triton kernel rescales (int32 * row scale * channel scale + bias -> the input's dtype);
- ``triton``: the same row quantizer, then one Triton int8 GEMM whose epilogue rescales, adds the bias and
  casts, so the int32 product never goes to memory.

Inside ``torch.compile`` ``eager`` and ``fused`` are the torch ops (inductor fuses them with their
neighbours) and ``triton`` calls its kernels behind a graph break. Without CUDA or Triton every form runs
the torch ops (``--tiny`` on the CPU). ``_int_mm`` needs M > 16 and K, N multiples of 8; the weight is kept
[N, K] contiguous and passed transposed (column-major), the layout cuBLASLt's int8 kernels want (torchao
0.17 makes it row-major with a copy per call, see evals/results/regcache/h200/README.md).
"""

from __future__ import annotations

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

FORMS = ("eager", "fused", "triton")


def quantize_rows_ref(rows: torch.Tensor):
    """Torch-op reference: int8 rows and their fp32 scales (symmetric, amax / 127)."""
    xf = rows.float()
    xs = xf.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
    return (xf / xs).round().clamp(-127, 127).to(torch.int8), xs


if triton is not None:

    @triton.jit
    def _quant_rows(x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK_K: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8) / 127.0
        q = x / scale
        # half away from zero (torch.round is half to even: they differ on exact ties only)
        q = tl.where(q >= 0, tl.floor(q + 0.5), tl.ceil(q - 0.5))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.int8), mask=mask)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _rescale(acc_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, N, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < N
        acc = tl.load(acc_ptr + row * N + offs, mask=mask, other=0).to(tl.float32)
        y = acc * tl.load(xs_ptr + row) * tl.load(ws_ptr + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * N + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gemm_rescale(
        a_ptr,
        w_ptr,
        xs_ptr,
        ws_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        K,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # a: [M, K] int8 row-major; w: [N, K] int8 row-major (both K-major, what Hopper's int8 MMA reads)
        pid = tl.program_id(0)
        grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * grid_n)  # groups of GROUP_M row tiles share weight tiles in L2
        first_m = group * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
        pid_n = (pid % (GROUP_M * grid_n)) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        am = tl.where(rm < M, rm, 0)
        wn = tl.where(rn < N, rn, 0)
        a_ptrs = a_ptr + am[:, None] * K + rk[None, :]
        w_ptrs = w_ptr + wn[None, :] * K + rk[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:  # no masks: the loads pipeline unpredicated
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0)
                w = tl.load(w_ptrs, mask=rk[:, None] < left, other=0)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y = acc.to(tl.float32) * tl.load(xs_ptr + am)[:, None] * tl.load(ws_ptr + wn)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + wn).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    # Hopper int8 tiles: 128-deep K steps; a few shapes, tuned per (M, N, K) on first use
    GEMM_CONFIGS = [
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8
        ),
        triton.Config(
            {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8
        ),
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=8
        ),
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4
        ),
        triton.Config(
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4
        ),
    ]
    _gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K"])(
        triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_gemm_rescale)
    )


def quantize_rows(rows: torch.Tensor):
    """int8 rows [M, K] and fp32 scales [M, 1]: one Triton kernel (rows contiguous in K)."""
    m, k = rows.shape
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    q = torch.empty(m, k, dtype=torch.int8, device=rows.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=rows.device)
    block = triton.next_power_of_2(k)
    _quant_rows[(m,)](rows, q, s, k, rows.stride(0), BLOCK_K=block, num_warps=8 if block >= 4096 else 4)
    return q, s


def rescale(acc: torch.Tensor, xs, ws, bias, dtype) -> torch.Tensor:
    """acc [M, N] int32 * xs [M, 1] * ws [N] (+ bias) -> dtype, one Triton kernel."""
    m, n = acc.shape
    y = torch.empty(m, n, dtype=dtype, device=acc.device)
    block = min(triton.next_power_of_2(n), 1024)
    b = bias if bias is not None else ws
    _rescale[(m, triton.cdiv(n, block))](acc, xs, ws, b, y, n, HAS_BIAS=bias is not None, BLOCK_N=block)
    return y


def gemm_rescale(xq, xs, wq, ws, bias, dtype, config: dict | None = None) -> torch.Tensor:
    """(xq [M, K] @ wq [N, K]^T) * xs * ws (+ bias) -> dtype in one Triton GEMM; ``config`` fixes the tile
    (tests under the interpreter), else autotuned."""
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty(m, n, dtype=dtype, device=xq.device)
    b = bias if bias is not None else ws
    args = (xq, wq, xs, ws, b, y, m, n, k)
    if config is None:

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _gemm_tuned[grid](*args, HAS_BIAS=bias is not None)
    else:
        g = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        even = k % config["BLOCK_K"] == 0
        _gemm_rescale[g](*args, HAS_BIAS=bias is not None, EVEN_K=even, **config)
    return y


def _kernels_usable(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


class Int8Linear(nn.Module):
    """A linear as W8A8 in one of ``FORMS`` (see the module's docstring); same numbers up to rounding ties."""

    def __init__(self, linear: nn.Linear, form: str = "eager"):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"Int8Linear form must be one of {FORMS}, got {form!r}")
        n, k = linear.weight.shape
        if n % 8 or k % 8:
            raise ValueError(f"torch._int_mm needs in and out features multiples of 8, got {k} -> {n}")
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-8) / 127
        self.register_buffer("wq", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))  # [N, K]
        self.register_buffer("ws", scale)
        self.bias = linear.bias
        self.form = form

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= 16:  # _int_mm's lower bound on M: pad (a few rows; the tower never gets here)
            pad = rows.new_zeros(17 - rows.shape[0], rows.shape[1])
            return self.forward(torch.cat([rows, pad]))[: rows.shape[0]].view(*x.shape[:-1], -1)
        if self.form == "triton" and _kernels_usable(rows):
            y = self._triton(rows)
        elif self.form == "fused" and _kernels_usable(rows) and not torch.compiler.is_compiling():
            y = self._fused(rows)
        elif self.form == "eager" and not torch.compiler.is_compiling():
            y = self._eager(rows)
        else:
            y = self._ops(rows)
        return y.view(*x.shape[:-1], -1)

    def _eager(self, rows):  # the first H200 run's code, kept as it was so that its numbers reproduce
        xs = rows.abs().amax(1, keepdim=True).float().clamp_min(1e-8) / 127
        xq = (rows.float() / xs).round().clamp(-127, 127).to(torch.int8)
        y = (torch._int_mm(xq, self.wq.t()).float() * xs * self.ws).to(rows.dtype)
        return y if self.bias is None else y + self.bias

    def _ops(self, rows):  # what torch.compile sees: one fp32 copy, the rest fused by inductor
        xq, xs = quantize_rows_ref(rows)
        y = torch._int_mm(xq, self.wq.t()).float() * xs * self.ws
        y = y if self.bias is None else y + self.bias
        return y.to(rows.dtype)

    def _fused(self, rows):
        xq, xs = quantize_rows(rows)
        return rescale(torch._int_mm(xq, self.wq.t()), xs, self.ws, self.bias, rows.dtype)

    @torch.compiler.disable
    def _triton(self, rows):
        xq, xs = quantize_rows(rows)
        return gemm_rescale(xq, xs, self.wq, self.ws, self.bias, rows.dtype)


def quantize_linears(module: nn.Module, form: str) -> int:
    """Every nn.Linear under ``module`` to ``Int8Linear(form)`` in place; returns how many."""
    count = 0
    for mod in list(module.modules()):
        for name, lin in list(mod.named_children()):
            if isinstance(lin, nn.Linear):
                setattr(mod, name, Int8Linear(lin, form))
                count += 1
    return count
