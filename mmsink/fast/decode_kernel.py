"""The decode step's attention as a Triton kernel that also writes the new token's key and value:
``generate_fast(step=StepOptions(attn="kernel"))``.

    o = attend(q, k, v, kb, vb, ok, start, t, scale, rot=None)

q [B, H, 1, d], k / v [B, KVH, 1, d] (the new token's), kb / vb [B, KVH, S, d] the layer's static
buffers, ok [B, S] their valid slots (none after ``start + t``: the buffers fill in order), ``start`` /
``t`` 0-dim long device tensors (the slot written is ``start + t``). Writes k / v and ``ok`` at the slot
and returns the attention of q over the valid slots, scores, softmax and sums in fp32. ``rot``: None
where q and k come rotated, else (cos, sin) [B, 1, d] of the rotary embedding in its common form
(``x * cos + rotate_half(x) * sin``; ``standard_rope`` checks a model's), applied in the kernel: the
step's two rotation kernels a layer go.

Why by hand: SDPA with a boolean mask at one query costs per layer a mask conversion (a fill and a
``where``), cuDNN's kernel (one block per head at batch 1) and a reduction, beside the index writes of the
key, the value, the validity and the slot's add (a tenth of the H200's LLaVA-1.5-7B step).
Here: one split-KV kernel (one program per sample, query head and chunk of slots; the new key / value come
from registers and are stored by the chunk that holds the slot, for the first query head of each KV head),
whose last program of each head to finish combines the head's chunks (counted in ``lock``). A query head of
a GQA group reads its KV head's rows again (from L2: the other heads' programs run alongside). On CPU (and
without Triton) ``reference`` does the same arithmetic in torch; with ``TRITON_INTERPRET=1`` set before
Triton is imported the kernel runs on CPU tensors (the tests).
"""

from __future__ import annotations

import torch

from ..core import kernels
from .decode import grouped, write_slot

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference
    triton = None

INTERPRET = kernels.INTERPRET
PROGRAMS = 512  # split-KV programs aimed at per call (the H200 has 132 SMs)
WARPS = 2  # of 2, 4, 8 the fastest at every 7B shape (evals/results/decode_kernel)
SHORT = 512  # buffers of at most this many slots take loop steps of 32 (``plan``)
LONG, WIDE = 2048, 256  # slots and batch x heads from which SDPA attends instead (``through_sdpa``)


def available(device) -> bool:
    """Whether the kernels run on ``device`` (CUDA with Triton, or any under the interpreter);
    ``MMSINK_DECODE_KERNEL=0`` turns them off (the torch reference then runs, e.g. to compare)."""
    return kernels.available(device, "MMSINK_DECODE_KERNEL")


def rotate(x, cos, sin):
    """The rotary embedding's common form on x [B, heads, 1, d] with cos / sin [B, 1, d]."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + turned * sin[:, None]


def standard_rope(rope) -> bool:
    """Whether a model's ``apply_rotary_pos_emb(q, k, cos, sin)`` is ``rotate``'s form (checked on random
    values: a family with another form keeps its own rotation before the kernels)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 1, 1, 8, generator=g)
    cos, sin = torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    try:
        qr, kr = rope(q, k, cos, sin)
    except Exception:
        return False
    return torch.allclose(qr, rotate(q, cos, sin), atol=1e-6) and torch.allclose(
        kr, rotate(k, cos, sin), atol=1e-6
    )


def rotated_and_written(q, k, v, kb, vb, ok, start, t, rot):
    """The kernel's rotation (``rot``: in fp32, rounded once, as the kernel and the compiled step's own
    rotation) and writes of the new key / value / validity at ``start + t``, in torch: the query to attend
    with."""
    if rot is not None:
        cos, sin = (r.float() for r in rot)
        q, k = (rotate(x.float(), cos, sin).to(x.dtype) for x in (q, k))
    write_slot(kb, vb, ok, k, v, (start + t).view(1))
    return q


def reference(q, k, v, kb, vb, ok, start, t, scale: float, rot=None, lock=None):
    """The kernel's arithmetic in torch (in place on kb / vb / ok as they are; ``lock``: unused)."""
    q = rotated_and_written(q, k, v, kb, vb, ok, start, t, rot)
    b, h, _, d = q.shape
    kvh = kb.shape[1]
    g = q.float().view(b, kvh, h // kvh, d)  # head i reads KV head i // (h // kvh)
    s = torch.matmul(g, kb.float().transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~ok[:, None, None, :], float("-inf")), -1)
    return torch.matmul(p, vb.float()).reshape(b, h, 1, d).to(q.dtype)


if triton is not None:

    @triton.jit
    def _attn_split(
        q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, ok_ptr, start_ptr, t_ptr, o_ptr, po_ptr, pm_ptr, pl_ptr,
        lock_ptr, cos_ptr, sin_ptr, scale, S, CHUNK, NS,
        sq_b, sq_h, skn_b, skn_h, svn_b, svn_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sok_b, sc_b, ss_b, so_b,
        so_h, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, NSP: tl.constexpr,
        ROT: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)  # b * H + h
        sp = tl.program_id(1)
        b = pid // H
        h = pid % H
        kh = h // G
        slot = tl.load(start_ptr) + tl.load(t_ptr)
        di = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + di)
        kn = tl.load(kn_ptr + b * skn_b + kh * skn_h + di)
        vn = tl.load(vn_ptr + b * svn_b + kh * svn_h + di)
        if ROT:  # x * cos + rotate_half(x) * sin, rounded to the model's dtype as the rotated q / k would be
            di2 = (di + D // 2) % D
            sign = tl.where(di < D // 2, -1.0, 1.0)
            c = tl.load(cos_ptr + b * sc_b + di).to(tl.float32)
            sn = tl.load(sin_ptr + b * ss_b + di).to(tl.float32) * sign
            q2 = tl.load(q_ptr + b * sq_b + h * sq_h + di2).to(tl.float32)
            k2 = tl.load(kn_ptr + b * skn_b + kh * skn_h + di2).to(tl.float32)
            q = (q.to(tl.float32) * c + q2 * sn).to(q_ptr.dtype.element_ty)
            kn = (kn.to(tl.float32) * c + k2 * sn).to(kn_ptr.dtype.element_ty)
        q = q.to(tl.float32) * scale
        kbase = k_ptr + b.to(tl.int64) * sk_b + kh * sk_h
        vbase = v_ptr + b.to(tl.int64) * sv_b + kh * sv_h
        lo = sp * CHUNK
        hi = tl.minimum(CHUNK, slot + 1 - lo)  # the buffers fill in order: no valid slot after ``slot``
        m = tl.full([], float("-inf"), tl.float32)
        den = tl.zeros([], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for off in range(0, hi, BLOCK):
            pos = lo + off + tl.arange(0, BLOCK)
            inb = pos < S
            new = pos == slot
            valid = ((tl.load(ok_ptr + b * sok_b + pos, mask=inb, other=0) != 0) & inb) | new
            rd = (valid & ~new)[:, None]  # rows read from the buffer (masked rows cost no bytes)
            kk = tl.load(kbase + pos[:, None] * sk_s + di[None, :], mask=rd, other=0.0)
            vv = tl.load(vbase + pos[:, None] * sv_s + di[None, :], mask=rd, other=0.0)  # both in flight
            kk = tl.where(new[:, None], kn[None, :], kk).to(tl.float32)
            s = tl.where(valid, tl.sum(kk * q[None, :], 1), float("-inf"))  # [BLOCK]
            m_new = tl.maximum(m, tl.max(s, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: no NaN from -inf - -inf
            alpha = tl.exp(m - m_use)
            p = tl.exp(s - m_use)
            den = den * alpha + tl.sum(p, 0)
            vv = tl.where(new[:, None], vn[None, :], vv).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * vv, 0)
            m = m_new
        # the chunk holding the slot stores the new key / value (once per KV head) and the validity
        mine = (slot >= lo) & (slot < lo + CHUNK) & (h % G == 0)
        tl.store(kbase + slot * sk_s + di, kn.to(k_ptr.dtype.element_ty), mask=mine & (di < D))
        tl.store(vbase + slot * sv_s + di, vn.to(v_ptr.dtype.element_ty), mask=mine & (di < D))
        tl.store(ok_ptr + b * sok_b + slot, 1, mask=mine & (h == 0))
        if NSP == 1:  # one chunk per head: the output itself
            tl.store(o_ptr + b * so_b + h * so_h + di, (acc / den).to(o_ptr.dtype.element_ty))
        else:
            row = pid * NS + sp
            tl.store(pm_ptr + row, m)
            tl.store(pl_ptr + row, den)
            tl.store(po_ptr + row * D + di, acc)
            # the head's last program to finish combines its chunks (no second kernel) and sets the count
            # back to 0 for the next call; acq_rel: the others' partials are visible to it
            if tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu") == NS - 1:
                j = tl.arange(0, NSP)
                jm = j < NS
                pms = tl.load(pm_ptr + pid * NS + j, mask=jm, other=float("-inf"), volatile=True)
                pls = tl.load(pl_ptr + pid * NS + j, mask=jm, other=0.0, volatile=True)
                rows = (pid * NS + j)[:, None] * D + di[None, :]
                part = tl.load(po_ptr + rows, mask=jm[:, None], other=0.0, volatile=True)
                top = tl.max(pms, 0)
                w = tl.where(pms == float("-inf"), 0.0, tl.exp(pms - top))
                out = tl.sum(w[:, None] * part, 0) / tl.sum(w * pls, 0)
                tl.store(o_ptr + b * so_b + h * so_h + di, out.to(o_ptr.dtype.element_ty))
                tl.atomic_xchg(lock_ptr + pid, 0, sem="relaxed", scope="gpu")


def plan(b: int, h: int, s: int, d: int, block: int | None = None, programs: int = PROGRAMS):
    """(BLOCK, CHUNK): slots per loop step (default a [BLOCK, d] fp32 tile of 8k values, at most 32 slots
    where the buffers hold 512 or fewer) and per program (about ``programs`` programs in all, whole loop
    steps; at most the slots: a large batch's chunk past them would loop over masked steps, which read
    nothing but still compute; evals/results/gpu_next/h200, part 40)."""
    # steps of 32 were faster at every 512-slot shape timed (NeXT pruned to 320 at batches 1, 128 and 412)
    # and slower at every longer one (768-3072 slots; parts 49-51)
    block = block or max(16, min(64 if s > SHORT else 32, 8192 // d))
    per = min(-(-s * b * h // programs), s)
    return block, max(block, -(-per // block) * block)


def launch(
    q,
    k,
    v,
    kb,
    vb,
    ok,
    start,
    t,
    scale: float,
    rot=None,
    lock=None,
    block=None,
    programs=PROGRAMS,
    warps=WARPS,
):
    """The kernel on ``q``'s device (CUDA, or CPU under the interpreter). ``lock``: int32 zeros, one per
    sample and query head or more, which the kernel leaves at zero (the step's decoder keeps one, so no
    call clears it; made here when not given); ``block`` / ``programs`` / ``warps``: ``plan``'s and the
    kernel's (evals/decode_kernel_speed.py tries others)."""
    b, h, _, d = q.shape
    kvh, s = kb.shape[1], kb.shape[2]
    if d & (d - 1) or kb.stride(3) != 1 or vb.stride(3) != 1 or q.stride(3) != 1:
        raise ValueError("mmsink: the decode kernel needs a power-of-two head size and rows contiguous in d")
    block, chunk = plan(b, h, s, d, block, programs)
    ns = -(-s // chunk)
    dev = q.device
    o = torch.empty(b, h, 1, d, device=dev, dtype=q.dtype)
    if ns == 1:  # (batches of 16 and more at 7B shapes): no partials
        po = pm = pl = lock = o  # unread
    else:
        po = torch.empty(b * h * ns, d, device=dev, dtype=torch.float32)
        pm = torch.empty(b * h * ns, device=dev, dtype=torch.float32)
        pl = torch.empty(b * h * ns, device=dev, dtype=torch.float32)
        if lock is None:
            lock = torch.zeros(b * h, device=dev, dtype=torch.int32)
        elif lock.dtype != torch.int32 or lock.numel() < b * h:
            raise ValueError(f"mmsink: the decode kernel's lock must be int32 with >= {b * h} entries")
    okb = ok.view(torch.uint8)
    kn, vn = k[:, :, 0], v[:, :, 0]
    cos, sin = (q, q) if rot is None else (r[:, 0] for r in rot)  # q: unread
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or kn.stride(2) != 1 or vn.stride(2) != 1:
        raise ValueError("mmsink: the decode kernel needs cos / sin and the new key contiguous in d")
    _attn_split[(b * h, ns)](
        q, kn, vn, kb, vb, okb, start, t, o, po, pm, pl, lock, cos, sin, float(scale), s, chunk, ns,
        q.stride(0), q.stride(1), kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1),
        kb.stride(0), kb.stride(1), kb.stride(2), vb.stride(0), vb.stride(1), vb.stride(2), okb.stride(0),
        cos.stride(0), sin.stride(0), o.stride(0), o.stride(1), H=h, G=h // kvh, D=d, BLOCK=block,
        NSP=1 if ns == 1 else kernels.pow2(ns, 2), ROT=rot is not None, num_warps=warps,
    )  # fmt: skip
    return o


@torch.library.custom_op("mmsink::decode_attend", mutates_args=("kb", "vb", "ok", "lock"))
def _attend_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    ok: torch.Tensor,
    start: torch.Tensor,
    t: torch.Tensor,
    scale: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    lock: torch.Tensor | None,
) -> torch.Tensor:
    return launch(q, k, v, kb, vb, ok, start, t, scale, None if cos is None else (cos, sin), lock)


@_attend_op.register_fake
def _(q, k, v, kb, vb, ok, start, t, scale, cos, sin, lock):
    return q.new_empty(q.shape)


def through_sdpa(b: int, h: int, kvh: int, s: int) -> bool:
    """Whether ``attend`` runs SDPA rather than the kernel on a GPU: one KV head per query head, buffers of
    LONG slots or more and WIDE or more of batch x heads. There SDPA measured faster on the H200 (unpruned
    NeXT's 3,072 slots: a step at batch 8 / 32 7.5 / 16.4 ms against the kernel's 7.8 / 17.5, part 45; one
    layer at batch 76 851 against 990 us, part 51); at batch 1, on shorter buffers and for GQA the kernel
    (or nothing was measured)."""
    return h == kvh and s >= LONG and b * kvh >= WIDE


def sdpa(q, k, v, kb, vb, ok, start, t, scale: float, rot=None):
    """The kernel's contract through torch: the same rotation and writes, then SDPA with the validity as
    its mask (the step's attention where ``through_sdpa``)."""
    q = rotated_and_written(q, k, v, kb, vb, ok, start, t, rot)
    return torch.nn.functional.scaled_dot_product_attention(
        q, kb, vb, attn_mask=ok[:, None, None, :], scale=scale, **grouped(q.shape[1], kb.shape[1])
    )


def attend(q, k, v, kb, vb, ok, start, t, scale: float, rot=None, lock=None):
    """The kernel where ``available`` (an opaque op to torch.compile, so it stays inside a compiled step
    and a CUDA graph) for a power-of-two head size, SDPA there where ``through_sdpa``, else ``reference``."""
    d = q.shape[-1]
    if available(q.device) and not d & (d - 1):
        if through_sdpa(q.shape[0], q.shape[1], kb.shape[1], kb.shape[2]):
            return sdpa(q, k, v, kb, vb, ok, start, t, scale, rot)
        cos, sin = (None, None) if rot is None else rot
        return _attend_op(q, k, v, kb, vb, ok, start, t, float(scale), cos, sin, lock)
    return reference(q, k, v, kb, vb, ok, start, t, scale, rot)
