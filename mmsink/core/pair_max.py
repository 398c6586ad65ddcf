"""Each row's highest entry over a set of columns, rows and columns picked by index, as one Triton kernel:
VisPruner's rounds (``mmsink.pruners.vispruner.choose``) read them from the residual's Gram matrix.

    best = pair_max(sim, a, b)

sim [B, R, R] (rows contiguous), a [B, La] / b [B, Lb] long indices into R: best[i, x] = max over y of
sim[i, a[i, x], b[i, y]], in sim's dtype (a max rounds nothing: the same values as torch's path; the
kernel compares in fp32, so fp64 takes torch's path).

Why by hand: torch's path gathers the rows [B, La, R], then their columns [B, La, Lb], then takes the max:
three kernels a round and two intermediates written, 64 rounds in sequence per LLaVA image at 64 of 576
(about 2 ms of the batch-16 prefill's selection graph on the H200, part 48). Here one program per sample and
block of rows reads the entries it needs (the matrix sits in L2) and writes only the maxima.

On CPU (and without Triton) ``pair_max`` is ``reference``; with ``TRITON_INTERPRET=1`` set before Triton is
imported the kernel runs on CPU tensors (the tests). ``MMSINK_PAIR_MAX_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import torch

from . import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path
    triton = None

ROWS = 16  # rows of ``a`` per program
COLS = 128  # entries of ``b`` per loop step


def available(device) -> bool:
    return kernels.available(device, "MMSINK_PAIR_MAX_KERNEL")


def reference(sim, a, b) -> torch.Tensor:
    rows = sim.gather(1, a[..., None].expand(-1, -1, sim.shape[2]))
    return rows.gather(2, b[:, None, :].expand(-1, a.shape[1], -1)).amax(-1)


if triton is not None:

    @triton.jit
    def _pair_max(sim_ptr, a_ptr, b_ptr, out_ptr, LA, LB, s_b, s_r, a_b, b_b, o_b, ROWS: tl.constexpr,
                  COLS: tl.constexpr):  # fmt: skip
        i = tl.program_id(0)
        x = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        xok = x < LA
        rows = tl.load(a_ptr + i * a_b + x, mask=xok, other=0)
        base = sim_ptr + i.to(tl.int64) * s_b + rows[:, None].to(tl.int64) * s_r
        best = tl.full([ROWS], float("-inf"), tl.float32)
        for y0 in range(0, LB, COLS):
            y = y0 + tl.arange(0, COLS)
            yok = y < LB
            cols = tl.load(b_ptr + i * b_b + y, mask=yok, other=0)
            v = tl.load(base + cols[None, :], mask=xok[:, None] & yok[None, :], other=float("-inf"))
            best = tl.maximum(best, tl.max(v.to(tl.float32), 1))
        tl.store(out_ptr + i * o_b + x, best.to(out_ptr.dtype.element_ty), mask=xok)


def pair_max(sim, a, b) -> torch.Tensor:
    """The kernel where ``available`` (rows of ``sim`` contiguous, at least one column, not fp64), else
    ``reference``."""
    if not available(sim.device) or sim.stride(2) != 1 or b.shape[1] == 0 or sim.dtype == torch.float64:
        return reference(sim, a, b)
    a, b = a.contiguous(), b.contiguous()
    n, la = a.shape
    out = torch.empty(n, la, device=sim.device, dtype=sim.dtype)
    if la:
        grid = (n, triton.cdiv(la, ROWS))
        _pair_max[grid](
            sim, a, b, out, la, b.shape[1], sim.stride(0), sim.stride(1), a.stride(0), b.stride(0),
            out.stride(0), ROWS=ROWS, COLS=COLS,
        )  # fmt: skip
    return out
