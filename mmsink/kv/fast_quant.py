"""``generate_fast`` with the KVSink quantized cache: ``wrap(model, kv={"quant": "int4", ...})``, pruned
or not (``prune=``).

The prefill runs through the wrapped model as ``generate``'s does (no hand-off: the kv hooks make the
``QuantCache``, or after a pruned prefill ``PlanQuantCache``, which quantizes the prompt's complete
groups). Its codes are then loaded into a static store and every new token is one fixed-shape step (one
CUDA-graph replay on GPU).

Slots, as ``WindowDecoder``'s: the stream (``S`` slots: validity, sink flags; the prefill's columns,
then the t-th new token at ``n + t``) and, per segment of layers (one without a pruner; a pruner's plan
gives layers that hold different tokens, as ``PlanQuantCache``), ``C`` slots of validity, rank (the
segment's own token count before each slot), quantized flags, the stream slot each slot holds, and the
exact-entry map; the segment's prefill slots first, the t-th new token at ``n_s + t``. Groups follow a
segment's ranks (a pruned layer seals its groups sooner in the stream), the kept-full tokens are the
stream's (its first ``first`` real tokens and the flagged sinks), looked up through each slot's stream
slot: ``PlanQuantCache``'s rule.

Store, per layer: key codes per sample by group index (``g`` consecutive ranks of the layer's tokens) with
one scale / offset per (group, channel); value codes per slot with one scale / offset per (token, channel
group); a ``g``-entry ring of exact keys / values indexed by rank mod ``g`` (it holds the incomplete
group's tokens wherever their slots are, so neither gaps in a mask nor a segment's own layout matter);
the exact copies of the kept-full tokens of quantized groups, ``entries`` per sample, with a slot ->
entry map per segment. The full-precision cache is never held. 2 / 4-bit codes are packed 4 / 2 to a
byte along the group (``squeeze``; this store's own layout, not quanto's) when the group size allows,
8-bit codes take a byte, 16-bit ones int32 (as ``generate``'s store).

Step: the token's key / value into the ring; each layer dequantizes its whole store and attends with SDPA
over its segment's slots (dequantize-then-attend: the same arithmetic as ``generate``'s assembled keys,
hence the same tokens, and fixed shapes; a fused low-bit attention kernel is not done here). After the
step, a sample whose count of tokens in a segment reached a multiple of ``g`` quantizes that group in the
segment's layers (``affine`` / ``key_rows`` of ``mmsink.kv.store`` and ``sealable`` / ``kept_full`` of
``mmsink.kv.quant``: the rule ``generate``'s cache runs), every sample computing one group and the others
writing it to a spare row: no host sync. With ``"auto"`` the ``sink_layer`` input of every new token is
scored, as ``generate``'s hooks do; decode tokens flagged beyond ``SPARE_SINKS`` overflow the entries and
``generate_fast`` refuses with one line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fast.decode import ROUND, FastDecoder, decode_kv, finish, grouped, project
from ..fast.store import kept_for
from .fast import WindowDecoder, packed
from .quant import kept_full, sealable
from .store import affine, decode, key_rows, triple

SPARE_SINKS = 32  # "auto": decode tokens that may be flagged as sinks before the entries are full
ENTRIES_ROUND = 16  # entries rounded up to this, so prompts with a few more or fewer sinks share a decoder


def squeeze(q: torch.Tensor, per: int) -> torch.Tensor:
    """uint8 codes [..., n] -> [..., n / per], ``per`` codes to a byte (code i in bits i * 8 / per ..)."""
    if per == 1:
        return q
    bits = 8 // per
    q = q.unflatten(-1, (-1, per))
    out = q[..., 0].clone()
    for i in range(1, per):
        out |= q[..., i] << (bits * i)
    return out


def spread(p: torch.Tensor, per: int) -> torch.Tensor:
    """``squeeze``'s inverse: [..., n / per] -> [..., n]."""
    if per == 1:
        return p
    bits = 8 // per
    return torch.stack([(p >> (bits * i)) & (2**bits - 1) for i in range(per)], -1).flatten(-2)


def entries_needed(cfg, cache, steps: int) -> int:
    """Exact entries per sample: the first ``first`` tokens, with "auto" also every flagged one."""
    if not cfg.keep_sinks:
        return 0
    if not cfg.auto:
        return cfg.first
    need = cfg.first + int(cache.sink.sum(1).max()) + min(steps, SPARE_SINKS)
    return -(-need // ENTRIES_ROUND) * ENTRIES_ROUND


def layout(cache):
    """(segment of each layer, per segment (valid [B, T_s], stream slot of each slot [B, T_s] (-1 on
    padding), quantized [B, T_s])) of a quantized cache after its prefill. Segments no layer runs on
    (aliased by the plan's unmask) are left out and the rest renumbered."""
    segs = getattr(cache, "layer_segment", None)
    if segs:  # a pruned prefill: PlanQuantCache's segments
        used = sorted(set(segs))
        parts = []
        for s in used:
            valid = cache.segment_valid[s]
            done = cache.seg_done[s] if s < len(cache.seg_done) else None
            parts.append((valid, cache.seg_origin[s], widened(done, valid)))
        return [used.index(s) for s in segs], parts
    return [0] * len(cache.layers), [(cache.valid, cache.origin, widened(cache.done, cache.valid))]


def widened(done, valid):
    """``done`` [B, <= T] (or None: nothing quantized) as [B, T]."""
    out = torch.zeros_like(valid)
    if done is not None:
        out[:, : done.shape[1]] = done.to(out.device)
    return out


class QuantDecoder(FastDecoder):
    """``FastDecoder``'s step and bookkeeping over the quantized store (``FastDecoder``'s own key / value
    buffers are the ``g``-entry rings), with ``WindowDecoder``'s stream and per-segment slots."""

    def __init__(
        self,
        family,
        cfg,
        stream: int,
        segs: list[int],
        layer_seg: list[int],
        entries: int,
        batch: int,
        max_new: int,
        eos: tuple,
    ):
        g = cfg.group_size
        super().__init__(family, [g] * len(family.layers), batch, max_new, eos, compile=False)
        self.cfg, self.g, self.bits, self.entries = cfg, g, cfg.bits, entries
        self.layer_seg = list(layer_seg)
        b, hk, _, d = self.k[0].shape
        dev, dtype = self.k[0].device, self.k[0].dtype
        self.cg = cg = min(g, d)
        self.caps = [segs[s] for s in layer_seg]
        # the stream: validity, ranks (for the first ``first`` real tokens), sink flags
        self.ok = torch.zeros(batch, stream, dtype=torch.bool, device=dev)
        self.rank = torch.zeros(batch, stream, dtype=torch.long, device=dev)
        self.sink = torch.zeros(batch, stream, dtype=torch.bool, device=dev)
        self.s_start = torch.zeros((), dtype=torch.long, device=dev)  # the stream slot of new token 0
        # per segment (one spare column each in ``sealed`` / ``xmap``: where samples that seal nothing write)
        self.seg_ok = [torch.zeros(batch, c, dtype=torch.bool, device=dev) for c in segs]
        self.seg_rank = [torch.zeros(batch, c, dtype=torch.long, device=dev) for c in segs]
        self.sealed = [torch.zeros(batch, c + 1, dtype=torch.bool, device=dev) for c in segs]
        self.xmap = [torch.full((batch, c + 1), entries, dtype=torch.long, device=dev) for c in segs]
        self.xn = [torch.zeros(batch, dtype=torch.long, device=dev) for _ in segs]
        # the inverse of xmap: each exact entry's slot (unused: the spare slot c)
        self.xslot = [torch.full((batch, entries + 1), c, dtype=torch.long, device=dev) for c in segs]
        self.origin = [torch.zeros(batch, c, dtype=torch.long, device=dev) for c in segs]  # stream slots
        self.seg_start = [torch.zeros((), dtype=torch.long, device=dev) for _ in segs]
        self.valid = [self.seg_ok[s] for s in layer_seg]  # a layer's mask is its segment's validity
        self.overflow = torch.zeros((), dtype=torch.bool, device=dev)
        self.dims = torch.tensor(cfg.sink_dims or (0,), dtype=torch.long, device=dev)
        code = torch.int32 if self.bits == 16 else torch.uint8
        per = 8 // self.bits if self.bits in (2, 4) else 1
        self.per = per if g % per == 0 and cg % per == 0 else 1
        self.kc, self.ks, self.kz, self.vc, self.vs, self.vz, self.xk, self.xv = ([] for _ in range(8))
        for cap in self.caps:  # one spare group / slot / entry each: where samples that seal nothing write

            def zeros(*shape, dt=dtype):
                return torch.zeros(*shape, dtype=dt, device=dev)

            groups = -(-cap // g)
            self.kc.append(zeros(b, hk, groups + 1, d, g // self.per, dt=code))
            self.ks.append(zeros(b, hk, groups + 1, d, 1))
            self.kz.append(zeros(b, hk, groups + 1, d, 1))
            self.vc.append(zeros(b, hk, cap + 1, d // cg, cg // self.per, dt=code))
            self.vs.append(zeros(b, hk, cap + 1, d // cg, 1))
            self.vz.append(zeros(b, hk, cap + 1, d // cg, 1))
            self.xk.append(zeros(b, hk, entries + 1, d))
            self.xv.append(zeros(b, hk, entries + 1, d))

    sink_score = WindowDecoder.sink_score

    def nbytes(self) -> int:
        """Bytes the store holds (codes, scales, offsets, rings, exact entries; not the bookkeeping)."""
        parts = (self.kc, self.ks, self.kz, self.vc, self.vs, self.vz, self.k, self.v, self.xk, self.xv)
        return sum(x.numel() * x.element_size() for xs in parts for x in xs)

    def fill(self, cache, attention_mask, tok, delta, pad, tail=None) -> None:
        """Load the prefill's ``QuantCache`` / ``PlanQuantCache``: codes, scales, exact tails and sinks
        (once per prompt, outside the graph). Per layer one indexed write per buffer for the whole batch;
        the write positions are planned once per segment from the parts' shapes (host lists, no device
        read)."""
        layer_seg, parts = layout(cache)
        if layer_seg != self.layer_seg:
            raise ValueError("mmsink: the quantized cache's layer segments differ from the decoder's")
        n, stream = cache.valid.shape[1], self.ok.shape[1]
        for x in (*self.k, *self.v, *self.kc, *self.ks, *self.kz, *self.vc, *self.vs, *self.vz):
            x.zero_()
        for x, src in ((self.ok, cache.valid), (self.sink, cache.sink)):
            x.zero_()
            x[:, :n] = src
        self.s_start.fill_(n)
        orders = []  # per segment: [B, T_s] the slot of each rank (left-packed valid slots)
        for s, (valid, origin, done) in enumerate(parts):
            m, c = valid.shape[1], self.seg_ok[s].shape[1]
            for x, src in ((self.seg_ok[s], valid), (self.sealed[s], done)):
                x.zero_()
                x[:, :m] = src
            self.xmap[s].fill_(self.entries)
            self.xslot[s].fill_(c)
            self.xn[s].zero_()
            # the new tokens' stream slots follow the prompt's (slots past the run: never valid)
            self.origin[s][:, :m] = origin.clamp(min=0)
            self.origin[s][:, m:] = torch.arange(n, n + c - m, device=origin.device).clamp(max=stream - 1)
            self.seg_start[s].fill_(m)
            at = torch.arange(m, device=valid.device)
            orders.append(torch.where(valid, at, m).sort(dim=1, stable=True).values.to(self.ok.device))
        self.overflow.zero_()
        plans: dict = {}
        for i, layer in enumerate(cache.layers):
            s = self.layer_seg[i]
            self.start[i].fill_(parts[s][0].shape[1])
            if s not in plans:  # a segment's layers hold the same shapes: its first layer's plan
                plans[s] = plan = self.fill_plan(layer.parts, orders[s])
                xb, xe, xslot, xn = plan["x"]
                if len(xb):
                    self.xmap[s].index_put_((xb, xslot), xe)
                    self.xslot[s].index_put_((xb, xe), xslot)
                self.xn[s].copy_(xn)
            self.load_layer(i, layer.parts, plans[s])
        self.start_state(attention_mask, tok, delta, pad)

    def fill_plan(self, parts, order) -> dict:
        """Where a segment's parts go (``order``: its rank -> slot): per chunk group (sample, group index),
        per chunk token (sample, slot), per tail token (sample, ring entry), per sink (sample, entry, slot),
        in the order ``load_layer`` concatenates them."""
        g, dev = self.g, self.ok.device
        kb, kg, vb, vr, rb, rr, xb, xe, xr, xn = ([] for _ in range(10))
        for b, part in enumerate(parts):
            at = 0  # tokens of the chunks before
            for c in part.chunks:
                m = c.tokens // g
                kb += [b] * m
                kg += range(at // g, at // g + m)
                vb += [b] * c.tokens
                vr += range(at, at + c.tokens)
                at += c.tokens
            r = part.tail_k.shape[1]
            rb += [b] * r
            rr += (j % g for j in range(at, at + r))
            xb += [b] * len(part.sink_rank)
            xe += range(len(part.sink_rank))
            xr += part.sink_rank
            xn.append(len(part.sink_rank))

        def long(x):
            return torch.tensor(x, dtype=torch.long, device=dev)

        vb, xb = long(vb), long(xb)
        return dict(
            k=(long(kb), long(kg)),
            v=(vb, order[vb, long(vr)]),
            ring=(long(rb), long(rr)),
            x=(xb, long(xe), order[xb, long(xr)], long(xn)),
        )

    def load_layer(self, i: int, parts, plan) -> None:
        """Layer ``i``'s parts into its buffers: the chunks' codes / scales / offsets, the exact tails into
        the ring (by rank mod g), the exact sinks into the entries."""
        cg, per, bits, dev = self.cg, self.per, self.bits, self.k[i].device
        hk, d = self.k[i].shape[1], self.k[i].shape[3]
        chunks = [c for p in parts for c in p.chunks]
        if chunks:
            for name, dsts, (b, at), shape in (
                ("keys", (self.kc, self.ks, self.kz), plan["k"], (hk, -1, d)),
                ("values", (self.vc, self.vs, self.vz), plan["v"], (hk, -1, d // cg)),
            ):
                stored = [triple(getattr(c, name), bits) for c in chunks]
                for j, dst in enumerate(dsts):
                    # [H, n, ., w] per chunk -> [n, H, ., w], the batch's chunks one after another
                    src = torch.cat([x[j].view(*shape, x[j].shape[-1]).transpose(0, 1) for x in stored])
                    src = (squeeze(src, per) if j == 0 else src).to(dev, dst[i].dtype)
                    dst[i].transpose(1, 2).index_put_((b, at), src)
        b, at = plan["ring"]
        if len(b):
            for ring, name in ((self.k[i], "tail_k"), (self.v[i], "tail_v")):
                src = torch.cat([getattr(p, name).transpose(0, 1) for p in parts])
                ring.transpose(1, 2).index_put_((b, at), src.to(dev, ring.dtype))
        b, e, _, _ = plan["x"]
        if len(b):
            for dst, name in ((self.xk[i], "sink_k"), (self.xv[i], "sink_v")):
                src = torch.stack([x for p in parts for x in getattr(p, name)])
                dst.transpose(1, 2).index_put_((b, e), src.to(dev, dst.dtype))

    def start_op(self):
        out = super().start_op()
        for ok, rank, start in (
            (self.ok, self.rank, self.s_start),
            *zip(self.seg_ok, self.seg_rank, self.seg_start, strict=True),
        ):
            ok.index_fill_(1, (start + self.t).view(1), True)
            rank.copy_(ok.long().cumsum(1) - 1)
        return out

    def layers_op(self, lo: int, hi: int, h, cos, sin, t):
        plans: dict = {}  # segment -> slots_of (the ring and ranks change only between steps)
        for i in range(lo, hi):
            if self.cfg.auto and i == self.cfg.sink_layer:
                self.sink.index_copy_(1, (self.s_start + t).view(1), self.sink_score(h) > self.cfg.tau)
            s = self.layer_seg[i]
            if s not in plans:
                plans[s] = self.slots_of(s)
            h = self.layer(i, h, cos, sin, t, plans[s])
        return h, cos, sin, t

    def layer(self, i: int, h, cos, sin, t, plan=None):
        layer, s = self.layers[i], self.layer_seg[i]
        q, k, v = project(layer, h, cos, sin, self.heads, self.rope)
        slot = (self.seg_start[s] + t).view(1)
        at = (self.seg_rank[s].index_select(1, slot) % self.g)[:, None, :, None].expand_as(k)  # ring entry
        self.k[i].scatter_(2, at, k)
        self.v[i].scatter_(2, at, v)
        kb, vb = self.read(i, plan)
        o = F.scaled_dot_product_attention(
            q,
            kb,
            vb,
            attn_mask=self.seg_ok[s][:, None, None, :],
            scale=layer.self_attn.scaling,
            **grouped(self.heads, self.kv_heads),
        )
        return finish(layer, h, o)

    def read(self, i: int, plan=None):
        """Layer ``i``'s keys / values [B, Hk, C, D] over its segment's slots, as ``generate``'s cache
        assembles them: dequantized groups, the exact ring where not quantized, exact copies of the
        quantized sinks. ``plan``: ``slots_of`` of the layer's segment (computed once per step and segment).
        Full-size work is the dequantization and one gather into slot order; the ring (<= g tokens) and
        the exact entries are scattered in (a full-size gather and select for each costs 4x the bytes)."""
        g, cg, bits, dtype, s = self.g, self.cg, self.bits, self.k[i].dtype, self.layer_seg[i]
        b, hk, _, d = self.k[i].shape
        cap = self.seg_ok[s].shape[1]
        key_at, ring_at, ring_src, exact_at = self.slots_of(s) if plan is None else plan
        codes = spread(self.kc[i], self.per).view(-1, g)
        kq = decode(codes, self.ks[i].view(-1, 1), self.kz[i].view(-1, 1), bits, dtype)
        kb = kq.view(b, hk, -1).gather(2, key_at.view(b, 1, -1).expand(-1, hk, -1)).view(b, hk, cap + 1, d)
        codes = spread(self.vc[i], self.per).view(-1, cg)
        vb = decode(codes, self.vs[i].view(-1, 1), self.vz[i].view(-1, 1), bits, dtype)
        vb = vb.view(b, hk, cap + 1, d)
        ring_at, ring_src = (x[:, None, :, None].expand(-1, hk, -1, d) for x in (ring_at, ring_src))
        exact_at = exact_at[:, None, :, None].expand(-1, hk, -1, d)
        for buf, ring, exact in ((kb, self.k[i], self.xk[i]), (vb, self.v[i], self.xv[i])):
            buf.scatter_(2, exact_at, exact)  # unused entries go to the spare slot ``cap``
            buf.scatter_(2, ring_at, ring.gather(2, ring_src))
        return kb[:, :, :cap], vb[:, :, :cap]

    def slots_of(self, s: int):
        """Segment ``s``'s read plan, shared by its layers: (key_at [B, C + 1, D]: each slot's element in a
        layer's dequantized keys viewed [B, Hk, -1] (group, channel, rank mod g); ring_at / ring_src
        [B, g]: the unquantized valid slots (<= g: at most one group is open) and their ring entries;
        exact_at [B, entries + 1]: each exact entry's slot). Slot ``C`` is a spare: what it receives is
        dropped."""
        g, cap, ok = self.g, self.seg_ok[s].shape[1], self.seg_ok[s]
        d = self.k[0].shape[-1]
        rank = self.seg_rank[s].clamp(min=0)
        rank = torch.cat([rank, rank.new_zeros(rank.shape[0], 1)], 1)
        ch = torch.arange(d, device=rank.device) * g
        key_at = ((rank // g) * (d * g) + rank % g)[..., None] + ch
        idx, hit = packed(ok & ~self.sealed[s][:, :cap], g)
        ring_at = torch.where(hit, idx, cap)
        ring_src = rank.gather(1, idx) % g
        return key_at, ring_at, ring_src, self.xslot[s]

    def book_op(self, nxt):
        super().book_op(nxt)
        full = kept_full(self.cfg, self.ok, self.sink, self.rank)  # [B, S] by stream slot
        for s in range(len(self.seg_ok)):
            self.seal(s, full)

    def seal(self, s: int, full_stream) -> None:
        """Quantize the group this step completed in segment ``s``, in every sample where it did (one
        group at most), in the segment's layers. The ring holds the group's tokens in rank order."""
        g, cg, bits, e = self.g, self.cg, self.bits, self.entries
        ok, rank, cap, xn = self.seg_ok[s], self.seg_rank[s], self.seg_ok[s].shape[1], self.xn[s]
        layers = [i for i, seg in enumerate(self.layer_seg) if seg == s]
        b, hk, _, d = self.k[layers[0]].shape
        complete = sealable(ok, self.sealed[s][:, :cap], rank, g)
        idx, hit = packed(complete, g)  # [B, g] the group's slots in order (all or none per sample)
        hit = hit[:, :1]
        full = full_stream.gather(1, self.origin[s]).gather(1, idx) & hit  # [B, g]
        group = torch.where(hit, rank.gather(1, idx[:, :1]) // g, self.kc[layers[0]].shape[2] - 1)  # [B, 1]
        slot = torch.where(hit, idx, cap)
        ent = torch.where(full, xn[:, None] + full.long().cumsum(1) - 1, e).clamp(max=e)
        self.overflow |= (xn + full.sum(1) > e).any()
        per = self.per
        at_k = group[:, None, :, None, None].expand(-1, hk, 1, d, g // per)
        at_v = slot[:, None, :, None, None].expand(-1, hk, g, d // cg, cg // per)
        at_x = ent[:, None, :, None].expand(-1, hk, -1, d)
        for i in layers:
            k, v = self.k[i], self.v[i]  # [B, Hk, g, D] exact, ranks g * group + 0 .. g - 1
            q, sc, z = affine(key_rows(k, full[:, None], g).reshape(-1, g), bits)
            self.kc[i].scatter_(2, at_k, squeeze(q.view(b, hk, 1, d, g), per))
            self.ks[i].scatter_(2, at_k[..., :1], sc.view(b, hk, 1, d, 1))
            self.kz[i].scatter_(2, at_k[..., :1], z.view(b, hk, 1, d, 1))
            q, sc, z = affine(v.reshape(-1, cg), bits)
            self.vc[i].scatter_(2, at_v, squeeze(q.view(b, hk, g, d // cg, cg), per))
            self.vs[i].scatter_(2, at_v[..., :1], sc.view(b, hk, g, d // cg, 1))
            self.vz[i].scatter_(2, at_v[..., :1], z.view(b, hk, g, d // cg, 1))
            self.xk[i].scatter_(2, at_x, k)
            self.xv[i].scatter_(2, at_x, v)
        self.xmap[s].scatter_(1, torch.where(full, idx, cap), ent)
        self.xslot[s].scatter_(1, ent, torch.where(full, idx, cap))  # the spare entry e: the spare slot
        xn += full.sum(1)
        self.sealed[s].scatter_(1, slot, True)


def quant_decoder(family, cfg, cache, batch: int, steps: int, eos, graphs: bool):
    """A decoder for this cache's layout, kept on the model by shape (as ``window_decoder``'s)."""
    layer_seg, parts = layout(cache)
    stream = -(-(cache.valid.shape[1] + steps) // ROUND) * ROUND
    segs = [-(-(valid.shape[1] + steps) // ROUND) * ROUND for valid, _, _ in parts]
    entries = entries_needed(cfg, cache, steps)
    new = -(-steps // ROUND) * ROUND
    key = ("quant", repr(cfg), batch, stream, tuple(segs), tuple(layer_seg), entries, new, eos, graphs)
    args = (family, cfg, stream, segs, layer_seg, entries, batch, new, eos)
    return kept_for(family, key, lambda: QuantDecoder(*args))


def generate_quant(family, handle, p, ids, max_new_tokens: int, graphs: bool, compile: bool, stop):
    """The new tokens [B, n] of greedy decoding over the quantized store after the prefill ``p``
    (``generate_fast``'s: the whole prompt through the model, no hand-off), pruned or not. ``stop``:
    (end-of-sequence ids, pad id). ``compile`` is ignored (the layer step is not compiled)."""
    from .quant import QuantCache

    def make(steps: int):
        return quant_decoder(family, handle.kv, p.cache, ids.shape[0], steps, stop[0], graphs)

    need = (QuantCache, "quant mode got no quantized cache")
    new, dec = decode_kv(family, p, ids, max_new_tokens, graphs, stop, need, make)
    if dec is not None and bool(dec.overflow):
        raise ValueError(
            f"mmsink: generate_fast's quant store filled up (more than {SPARE_SINKS} decode tokens flagged"
            " as sinks); use model.generate"
        )
    return new
