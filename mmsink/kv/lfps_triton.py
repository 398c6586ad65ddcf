"""LFPS's sparse decode step as two Triton kernels: what ``mmsink.kv.sparse.step(..., dense_step=False)``
computes (same chosen slots, attention output within fp32 rounding), without its ~30 aten ops (a sort of
the ~2k candidates, a top-k, gathers and fp32 copies).

    out, nxt = sparse_step(q, key, value, valid, hist, topk, expand, scaling, sinks=0, length=None)

Where it runs: ``generate_fast`` (``mmsink.kv.fast_sparse.SparseDecoder``) calls it for the sparse steps
on CUDA when Triton imports (``available``; ``MMSINK_LFPS_TRITON=0`` turns it off); the dense steps,
``generate``'s cache and every CPU run use the torch ``step``. With ``TRITON_INTERPRET=1`` set before
Triton is imported, the kernels run in Triton's interpreter on CPU tensors (how
``tests/test_lfps_triton.py`` checks them without a GPU).

1. ``_scores``, one program per (sample, head, block of history entries): the candidates of each entry
   ``p`` are ``p - expand .. p + expand + 1``. Each slot is kept once without a sort: a shifted slot
   ``p + o`` also comes from a history entry ``p + d`` (``1 <= d <= o + expand``) iff the next larger entry
   lies within ``o + expand`` of ``p``, so the candidate is dropped where that gap (a min over the
   history row, ``[block, history]`` compares) is that small: the copy with the smallest offset stays.
   The newest slot and the sinks (each sample's first ``sinks`` real slots) are extra candidates; shifted
   copies of them are dropped. Each candidate's exact score (q . k in fp32, times ``scaling``) and slot go
   to a small scratch buffer (-inf / -1 where none). Several programs per head: the key rows (~2k per
   head) are the bulk of the bytes, and batch x heads programs alone would leave most SMs idle.
2. ``_select``, one program per (sample, head), since the choice needs all of a head's scores: the sinks
   are chosen, then the top ``k - sinks`` of the other candidates. The k-th largest score is found by
   bisection on the scores' ordered int32 bit patterns, 16 thresholds counted per pass (~8 passes of
   counting reductions over registers, where a sort or top-k of ~2k values would be the step's slowest
   part); ties at the threshold go to the lowest candidate index. The chosen slots are packed into the
   next history (its first entries; -1 after them), then the softmax over their scores and the weighted
   sum of their values (fp32) are taken. A sample holding at most ``topk`` real keys (``all_long`` False:
   checked here, per sample, no host sync) attends to all of its real slots, as ``select`` does; its
   real keys are counted only where it has at most ``topk`` real candidates (more prove it long: after a
   dense step every long sample has), so a long sample does not scan the validity row.

The order of the next history differs from ``step``'s (slot-packed, not by score): ``candidates`` uses it
only as a set. GQA: a query head reads key head ``h // (heads // kv_heads)``. Block sizes and warps are
first choices, not tuned on a GPU yet.
"""

from __future__ import annotations

import contextlib

import torch

from ..core import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: ``available`` is False
    triton = None

INTERPRET = kernels.INTERPRET
PROBES = 16  # thresholds counted per bisection pass


def available(device) -> bool:
    """Whether ``sparse_step`` runs on ``device``: CUDA with Triton, or any device under the interpreter;
    never with ``MMSINK_LFPS_TRITON=0`` (``generate_fast`` then runs the torch step, e.g. to compare)."""
    return kernels.available(device, "MMSINK_LFPS_TRITON")


if triton is not None:

    @triton.jit
    def _scores(
        q_ptr,
        k_ptr,
        valid_ptr,
        hist_ptr,
        sink_ptr,
        len_ptr,
        score_ptr,
        slot_ptr,
        length_val,
        H,
        G,
        T,
        KH,
        NS,
        scaling,
        sq_b,
        sq_h,
        sq_d,
        sk_b,
        sk_h,
        sk_t,
        sk_d,
        sv_b,
        sh_b,
        sh_h,
        EXPAND: tl.constexpr,
        SB: tl.constexpr,
        KB: tl.constexpr,
        BLK: tl.constexpr,
        QC: tl.constexpr,
        EB: tl.constexpr,
        D: tl.constexpr,
        DC: tl.constexpr,
        LEN_PTR: tl.constexpr,
        HAS_SINKS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        part = tl.program_id(1)
        b = (pid // H).to(tl.int64)
        h = (pid % H).to(tl.int64)
        kbase = k_ptr + b * sk_b + (h // G) * sk_h
        qbase = q_ptr + b * sq_b + h * sq_h
        vrow = valid_ptr + b * sv_b
        hrow = hist_ptr + b * sh_b + h * sh_h
        NC: tl.constexpr = KB * SB + EB
        if LEN_PTR:
            length = tl.load(len_ptr).to(tl.int32)
        else:
            length = length_val
        newest = length - 1
        s_last = -1  # sinks are the real slots <= s_last (the first NS real ones)
        if HAS_SINKS:
            si = tl.arange(0, EB)
            sl = tl.load(sink_ptr + b * NS + si, mask=si < NS, other=T).to(tl.int32)
            s_last = tl.max(tl.where(sl < T, sl, -1), 0)

        rows = part * BLK + tl.arange(0, BLK)
        p = tl.load(hrow + rows, mask=rows < KH, other=-1).to(tl.int32)
        # distance to the next larger history entry (an equal one later in the row counts as 0)
        gap = tl.full([BLK], 1 << 30, tl.int32)
        for c0 in range(0, KB, QC):
            qi = c0 + tl.arange(0, QC)
            other = tl.load(hrow + qi, mask=qi < KH, other=-1).to(tl.int32)
            after = (other[None, :] > p[:, None]) | (
                (other[None, :] == p[:, None]) & (qi[None, :] > rows[:, None])
            )
            d = tl.where(after & (other[None, :] >= 0), other[None, :] - p[:, None], 1 << 30)
            gap = tl.minimum(gap, tl.min(d, 1))
        oi = tl.arange(0, SB)
        x = p[:, None] + (oi[None, :] - EXPAND)
        keep = (oi[None, :] < 2 * EXPAND + 2) & (p[:, None] >= 0) & (gap[:, None] > oi[None, :])
        keep = keep & (x >= 0) & (x < length) & (x != newest) & (x > s_last)
        keep = keep & (tl.load(vrow + x, mask=keep, other=0) != 0)
        acc = tl.zeros([BLK, SB], tl.float32)
        for d0 in range(0, D, DC):
            dd = d0 + tl.arange(0, DC)
            qd = tl.load(qbase + dd * sq_d, mask=dd < D, other=0.0).to(tl.float32)
            kv = tl.load(
                kbase + x[:, :, None] * sk_t + dd[None, None, :] * sk_d,
                mask=keep[:, :, None] & (dd < D)[None, None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(kv * qd[None, None, :], 2)
        at = pid.to(tl.int64) * NC + rows[:, None] * SB + oi[None, :]
        tl.store(score_ptr + at, tl.where(keep, acc * scaling, float("-inf")))
        tl.store(slot_ptr + at, tl.where(keep, x, -1))

        if part == 0:  # the extra candidates: [0] the newest slot, [1 .. NS] the sinks
            ei = tl.arange(0, EB)
            es = tl.load(sink_ptr + b * NS + ei - 1, mask=(ei >= 1) & (ei <= NS), other=T).to(tl.int32)
            es = tl.where(ei == 0, newest, es)
            eok = (es >= 0) & (es < length) & ((ei > 0) | (newest > s_last))
            eok = eok & (tl.load(vrow + es, mask=eok, other=0) != 0)
            eacc = tl.zeros([EB], tl.float32)
            for d0 in range(0, D, DC):
                dd = d0 + tl.arange(0, DC)
                qd = tl.load(qbase + dd * sq_d, mask=dd < D, other=0.0).to(tl.float32)
                kv = tl.load(
                    kbase + es[:, None] * sk_t + dd[None, :] * sk_d,
                    mask=eok[:, None] & (dd < D)[None, :],
                    other=0.0,
                ).to(tl.float32)
                eacc += tl.sum(kv * qd[None, :], 1)
            eat = pid.to(tl.int64) * NC + KB * SB + ei
            tl.store(score_ptr + eat, tl.where(eok, eacc * scaling, float("-inf")))
            tl.store(slot_ptr + eat, tl.where(eok, es, -1))

    @triton.jit
    def _ordered(s):
        """int32 keys in the order of the fp32 scores (a negative float's bits count down)."""
        bits = s.to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _pick(score_ptr, slot_ptr, nxt, wrow, pid, KO, NM: tl.constexpr, EB: tl.constexpr, NP: tl.constexpr):
        """The long case: sinks, then the top KO - sinks others by bisection; packed into nxt / wrow."""
        NC: tl.constexpr = NM + EB
        mi = tl.arange(0, NM)
        ei = tl.arange(0, EB)
        base = pid.to(tl.int64) * NC
        sc = tl.load(score_ptr + base + mi)
        sl = tl.load(slot_ptr + base + mi)
        esc = tl.load(score_ptr + base + NM + ei)
        esl = tl.load(slot_ptr + base + NM + ei)
        okm = sl >= 0
        forced = (ei >= 1) & (esl >= 0)
        free = (ei == 0) & (esl >= 0)
        avail = tl.sum(okm.to(tl.int32), 0) + tl.sum(free.to(tl.int32), 0)
        want = tl.minimum(KO - tl.sum(forced.to(tl.int32), 0), avail)
        key = _ordered(sc)
        ekey = _ordered(esc)
        big = 0x7FFFFFFF
        lo = tl.minimum(tl.min(tl.where(okm, key, big), 0), tl.min(tl.where(free, ekey, big), 0)).to(tl.int64)
        hi = tl.maximum(tl.max(tl.where(okm, key, -big), 0), tl.max(tl.where(free, ekey, -big), 0)).to(
            tl.int64
        )
        hi = hi + 1
        # invariant: at least ``want`` keys >= lo, fewer than ``want`` >= hi; ends with lo the want-th largest
        while hi - lo > 1:
            probe = lo + ((hi - lo) * (tl.arange(0, NP) + 1).to(tl.int64)) // (NP + 1)
            p32 = probe.to(tl.int32)
            cnt = tl.sum(((key[None, :] >= p32[:, None]) & okm[None, :]).to(tl.int32), 1)
            cnt += tl.sum(((ekey[None, :] >= p32[:, None]) & free[None, :]).to(tl.int32), 1)
            good = cnt >= want
            lo = tl.maximum(tl.max(tl.where(good, probe, lo), 0), lo)
            hi = tl.minimum(tl.min(tl.where(good, hi, probe), 0), hi)
        thr = lo.to(tl.int32)
        egt = free & (ekey > thr)
        mgt = okm & (key > thr)
        need = want - tl.sum(egt.to(tl.int32), 0) - tl.sum(mgt.to(tl.int32), 0)
        eeq = free & (ekey == thr)
        meq = okm & (key == thr)
        erank = tl.cumsum(eeq.to(tl.int32), 0)
        mrank = tl.cumsum(meq.to(tl.int32), 0) + tl.sum(eeq.to(tl.int32), 0)
        echo = forced | egt | (eeq & (erank <= need))
        mcho = mgt | (meq & (mrank <= need))
        epos = tl.cumsum(echo.to(tl.int32), 0) - 1
        ne = tl.sum(echo.to(tl.int32), 0)
        mpos = ne + tl.cumsum(mcho.to(tl.int32), 0) - 1
        tl.store(nxt + epos, esl.to(tl.int64), mask=echo)
        tl.store(wrow + epos, esc, mask=echo)
        tl.store(nxt + mpos, sl.to(tl.int64), mask=mcho)
        tl.store(wrow + mpos, sc, mask=mcho)
        return ne + tl.sum(mcho.to(tl.int32), 0)

    @triton.jit
    def _select(
        q_ptr,
        k_ptr,
        v_ptr,
        valid_ptr,
        score_ptr,
        slot_ptr,
        nxt_ptr,
        w_ptr,
        out_ptr,
        H,
        G,
        T,
        KO,
        topk,
        scaling,
        sq_b,
        sq_h,
        sq_d,
        sk_b,
        sk_h,
        sk_t,
        sk_d,
        sv_b,
        sw_b,
        sw_h,
        sw_t,
        sw_d,
        NM: tl.constexpr,
        EB: tl.constexpr,
        KOB: tl.constexpr,
        NP: tl.constexpr,
        D: tl.constexpr,
        DC: tl.constexpr,
        BT: tl.constexpr,
        CHECK_SHORT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = (pid // H).to(tl.int64)
        h = (pid % H).to(tl.int64)
        kh = h // G
        qbase = q_ptr + b * sq_b + h * sq_h
        kbase = k_ptr + b * sk_b + kh * sk_h
        vbase = v_ptr + b * sw_b + kh * sw_h
        vrow = valid_ptr + b * sv_b
        nxt = nxt_ptr + pid.to(tl.int64) * KO
        wrow = w_ptr + pid.to(tl.int64) * KOB
        ko = tl.arange(0, KOB)
        short = False
        if CHECK_SHORT:
            # more than topk real candidates (distinct real slots): long, no need to count the real keys
            # (every long sample after a dense step); else count them (a while loop, not a range over T:
            # Triton 3.6's interpreter cannot range over an argument)
            base = pid.to(tl.int64) * (NM + EB)
            held = tl.sum((tl.load(slot_ptr + base + tl.arange(0, NM)) >= 0).to(tl.int32), 0)
            held += tl.sum((tl.load(slot_ptr + base + NM + tl.arange(0, EB)) >= 0).to(tl.int32), 0)
            if held <= topk:
                held = tl.full([], 0, tl.int32)
                t0 = tl.full([], 0, tl.int32)
                while t0 < T:
                    tt = t0 + tl.arange(0, BT)
                    held += tl.sum((tl.load(vrow + tt, mask=tt < T, other=0) != 0).to(tl.int32), 0)
                    t0 += BT
            short = held <= topk
        if short:  # every real slot (at most topk of them), packed in slot order
            n = tl.full([], 0, tl.int32)
            t0 = tl.full([], 0, tl.int32)
            while t0 < T:
                tt = t0 + tl.arange(0, BT)
                real = tl.load(vrow + tt, mask=tt < T, other=0) != 0
                tl.store(nxt + n + tl.cumsum(real.to(tl.int32), 0) - 1, tt.to(tl.int64), mask=real)
                n += tl.sum(real.to(tl.int32), 0)
                t0 += BT
            tl.debug_barrier()
            slots = tl.load(nxt + ko, mask=ko < n, other=-1)
            acc = tl.zeros([KOB], tl.float32)
            for d0 in range(0, D, DC):
                dd = d0 + tl.arange(0, DC)
                qd = tl.load(qbase + dd * sq_d, mask=dd < D, other=0.0).to(tl.float32)
                kv = tl.load(
                    kbase + slots[:, None] * sk_t + dd[None, :] * sk_d,
                    mask=(slots >= 0)[:, None] & (dd < D)[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(kv * qd[None, :], 1)
            tl.store(wrow + ko, acc * scaling, mask=ko < n)
        else:
            n = _pick(score_ptr, slot_ptr, nxt, wrow, pid, KO, NM, EB, NP)
        tl.store(nxt + ko, tl.full([KOB], -1, tl.int64), mask=(ko >= n) & (ko < KO))
        tl.debug_barrier()  # the packed slots and scores, written above by other threads of this program

        slots = tl.load(nxt + ko, mask=ko < n, other=-1)
        ok = slots >= 0
        s = tl.load(wrow + ko, mask=ok, other=float("-inf"))
        e = tl.where(ok, tl.exp(s - tl.max(s, 0)), 0.0)
        w = e / tl.sum(e, 0)
        for d0 in range(0, D, DC):
            dd = d0 + tl.arange(0, DC)
            vv = tl.load(
                vbase + slots[:, None] * sw_t + dd[None, :] * sw_d,
                mask=ok[:, None] & (dd < D)[None, :],
                other=0.0,
            ).to(tl.float32)
            tl.store(out_ptr + pid.to(tl.int64) * D + dd, tl.sum(vv * w[:, None], 0), mask=dd < D)


def sparse_step(
    q,
    key,
    value,
    valid,
    hist,
    topk: int,
    expand: int,
    scaling: float,
    sinks: int = 0,
    length=None,
    all_long: bool = False,
    out_hist=None,
):
    """One sparse LFPS decode step: (attention output [B, H, D] fp32, the next history [B, H, min(topk, T)],
    chosen slots first, -1 after them). q [B, H, D]; key / value [B, Hk, T, D]; valid [B, T] bool; hist
    [B, H, k] (-1: none); ``length``: the keys held, an int or a 0-dim device tensor (default T);
    ``all_long``: every sample holds more than ``topk`` real keys (the per-sample check is skipped);
    ``out_hist``: a [B, H, min(topk, T)] int64 tensor to write the next history into (may be ``hist``)."""
    if triton is None:
        raise RuntimeError("lfps_triton: triton is not installed")
    b, h, d = q.shape
    if key.dim() != 4 or key.shape[0] != b or key.shape[3] != d or value.shape != key.shape:
        shapes = f"{tuple(key.shape)} / {tuple(value.shape)}"
        raise ValueError(f"lfps_triton: key / value {shapes} do not fit q {tuple(q.shape)}")
    hk, t = key.shape[1], key.shape[2]
    if h % hk:
        raise ValueError(f"lfps_triton: {h} query heads are not a multiple of {hk} key heads")
    if hist.dim() != 3 or hist.shape[:2] != (b, h) or valid.shape != (b, t):
        shapes = f"hist {tuple(hist.shape)} / valid {tuple(valid.shape)}"
        raise ValueError(f"lfps_triton: {shapes} do not fit q {tuple(q.shape)}, key {tuple(key.shape)}")
    if not 0 <= sinks < topk:
        raise ValueError(f"lfps_triton: sinks {sinks} not in 0 .. topk - 1 ({topk - 1})")
    kh, ko = hist.shape[2], min(topk, t)
    if out_hist is not None and (
        out_hist.shape != (b, h, ko) or out_hist.dtype != torch.long or not out_hist.is_contiguous()
    ):
        raise ValueError(f"lfps_triton: out_hist must be a contiguous int64 [{b}, {h}, {ko}] tensor")
    dev = q.device
    if not available(dev):
        raise ValueError(f"lfps_triton: runs on CUDA (or under TRITON_INTERPRET=1), not on {dev}")
    sb, kb = kernels.pow2(2 * expand + 2), kernels.pow2(kh, 16)
    eb, kob = kernels.pow2(1 + sinks, 16), kernels.pow2(ko, 16)
    nm = kb * sb
    # enough programs to spread the key reads over the GPU's SMs, in blocks of 32 to 64 history entries
    # (a [64, 4, 16] tile per step keeps _scores within sm_90's registers; larger ones spill: ptxas -v)
    split = max(kb // 64, min(kb // 32, kernels.pow2(-(-256 // (b * h))))) if kb >= 64 else 1
    blk = kb // split
    if sinks:
        from .sparse import sink_slots

        sink = sink_slots(valid, sinks)
    else:
        sink = hist  # unread
    vb = valid.view(torch.uint8)
    scores = torch.empty(b * h, nm + eb, device=dev, dtype=torch.float32)
    slots = torch.empty(b * h, nm + eb, device=dev, dtype=torch.int32)
    w = torch.empty(b * h, kob, device=dev, dtype=torch.float32)
    nxt = torch.empty(b, h, ko, device=dev, dtype=torch.long) if out_hist is None else out_hist
    out = torch.empty(b, h, d, device=dev, dtype=torch.float32)
    is_ptr = isinstance(length, torch.Tensor)
    lptr = length if is_ptr else hist  # unread
    lval = 0 if is_ptr else int(t if length is None else length)
    shared = (*q.stride(), *key.stride(), vb.stride(0))  # sq_*, sk_*, sv_b: both kernels' first strides
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():  # Triton's device
        _scores[(b * h, split)](
            q, key, vb, hist, sink, lptr, scores, slots, lval, h, h // hk, t, kh, sinks, float(scaling),
            *shared, *hist.stride()[:2],
            EXPAND=expand, SB=sb, KB=kb, BLK=blk, QC=min(64, kb), EB=eb, D=d, DC=16 if blk * sb <= 256 else 8,
            LEN_PTR=is_ptr, HAS_SINKS=sinks > 0, num_warps=4,
        )  # fmt: skip
        _select[(b * h,)](
            q, key, value, vb, scores, slots, nxt, w, out, h, h // hk, t, ko, topk, float(scaling),
            *shared, *value.stride(),
            NM=nm, EB=eb, KOB=kob, NP=PROBES, D=d, DC=min(32, kernels.pow2(d)), BT=4096,
            CHECK_SHORT=not all_long, num_warps=8 if nm <= 4096 else 16,
        )  # fmt: skip
    return out, nxt
