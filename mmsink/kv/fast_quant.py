"""``generate_fast`` with the KVSink quantized cache: ``wrap(model, kv={"quant": "int4", ...})``.

The prefill runs through the wrapped model as ``generate``'s does (no hand-off: the kv hooks make the
``QuantCache``, which quantizes the prompt's complete groups). Its codes are then loaded into a static
store and every new token is one fixed-shape step (one CUDA-graph replay on GPU).

Store, per layer (slots as ``FastDecoder``'s: the prefill's first, the t-th new token at ``n + t``):
key codes per sample by group index (a group is ``g`` consecutive ranks of the sample's own tokens, so
left padding does not move it) with one scale / offset per (group, channel); value codes per slot with
one scale / offset per (token, channel group); the exact keys / values of the last ``g`` slots (a ring:
the tokens of a sample's incomplete group are always among them); the exact copies of the kept-full
tokens (sinks) of quantized groups, ``entries`` per sample, with a slot -> entry map. The full-precision
cache is never held. 2 / 4-bit codes are packed 4 / 2 to a byte along the group (``squeeze``; this
store's own layout, not quanto's) when the group size allows, 8-bit codes take a byte, 16-bit ones int32
(as ``generate``'s store).

Step: the token's key / value into the ring; each layer dequantizes its whole store and attends with SDPA
(dequantize-then-attend: the same arithmetic as ``generate``'s assembled keys, hence the same tokens, and
fixed shapes; a fused low-bit attention kernel is not done here). After the step, a sample whose count
of tokens reached a multiple of ``g`` quantizes that group (``affine`` / ``key_rows`` of
``mmsink.kv.store`` and ``sealable`` / ``kept_full`` of ``mmsink.kv.quant``: the rule ``generate``'s
cache runs), every sample computing one group and the others writing it to a spare row: no host sync.
With ``"auto"`` the ``sink_layer`` input of every new token is scored, as ``generate``'s hooks do; decode
tokens flagged beyond ``SPARE_SINKS`` overflow the entries and ``generate_fast`` refuses with one line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fast.decode import ROUND, FastDecoder, finish, project
from ..fast.store import kept
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


class QuantDecoder(FastDecoder):
    """``FastDecoder``'s step and bookkeeping over the quantized store (``FastDecoder``'s own key / value
    buffers are the ``g``-slot rings)."""

    def __init__(self, family, cfg, cap: int, entries: int, batch: int, max_new: int, eos: tuple):
        g = cfg.group_size
        super().__init__(family, [g] * len(family.layers), batch, max_new, eos, compile=False)
        self.cfg, self.g, self.bits, self.entries = cfg, g, cfg.bits, entries
        b, hk, _, d = self.k[0].shape
        dev, dtype = self.k[0].device, self.k[0].dtype
        self.cg = cg = min(g, d)
        groups = -(-cap // g)
        self.caps = [cap] * len(self.layers)
        self.ok = torch.zeros(batch, cap, dtype=torch.bool, device=dev)
        self.valid = [self.ok] * len(self.layers)  # one slot set: no pruner (refused with quant)
        self.sink = torch.zeros(batch, cap, dtype=torch.bool, device=dev)
        self.sealed = torch.zeros(batch, cap + 1, dtype=torch.bool, device=dev)  # + a spare column
        self.xmap = torch.full((batch, cap + 1), entries, dtype=torch.long, device=dev)  # entries: none
        self.xn = torch.zeros(batch, dtype=torch.long, device=dev)
        self.overflow = torch.zeros((), dtype=torch.bool, device=dev)
        self.ring = torch.arange(cap, device=dev) % g
        self.rank = torch.zeros(batch, cap, dtype=torch.long, device=dev)
        self.dims = torch.tensor(cfg.sink_dims or (0,), dtype=torch.long, device=dev)
        code = torch.int32 if self.bits == 16 else torch.uint8
        per = 8 // self.bits if self.bits in (2, 4) else 1
        self.per = per if g % per == 0 and cg % per == 0 else 1

        def zeros(*shape, dt=dtype):
            return [torch.zeros(*shape, dtype=dt, device=dev) for _ in self.layers]

        # one spare group / slot / entry each: where samples that quantize nothing write
        self.kc = zeros(b, hk, groups + 1, d, g // self.per, dt=code)
        self.ks, self.kz = zeros(b, hk, groups + 1, d, 1), zeros(b, hk, groups + 1, d, 1)
        self.vc = zeros(b, hk, cap + 1, d // cg, cg // self.per, dt=code)
        self.vs, self.vz = zeros(b, hk, cap + 1, d // cg, 1), zeros(b, hk, cap + 1, d // cg, 1)
        self.xk, self.xv = zeros(b, hk, entries + 1, d), zeros(b, hk, entries + 1, d)

    sink_score = WindowDecoder.sink_score

    def nbytes(self) -> int:
        """Bytes the store holds (codes, scales, offsets, rings, exact entries; not the bookkeeping)."""
        parts = (self.kc, self.ks, self.kz, self.vc, self.vs, self.vz, self.k, self.v, self.xk, self.xv)
        return sum(x.numel() * x.element_size() for xs in parts for x in xs)

    def fill(self, cache, attention_mask, tok, delta, pad, tail=None) -> None:
        """Load the prefill's ``QuantCache``: codes, scales, exact tails and sinks (host loops: once per
        prompt, outside the graph)."""
        valid, g, n = cache.valid, self.g, cache.valid.shape[1]
        done = cache.done if cache.done is not None else torch.zeros_like(valid)
        for x in (*self.k, *self.v, *self.kc, *self.ks, *self.kz, *self.vc, *self.vs, *self.vz):
            x.zero_()
        for x, src in ((self.ok, valid), (self.sink, cache.sink), (self.sealed, done)):
            x.zero_()
            x[:, :n] = src
        self.xmap.fill_(self.entries)
        self.xn.zero_()
        self.overflow.zero_()
        self.start[0].fill_(n)
        slots = [v.nonzero()[:, 0] for v in valid]  # per sample: rank -> slot
        tail = torch.arange(max(0, n - g), n, device=valid.device)
        for i, layer in enumerate(cache.layers):
            keys, values = layer.full(valid, g)  # exact where not quantized
            self.k[i].index_copy_(2, tail % g, keys[:, :, tail])
            self.v[i].index_copy_(2, tail % g, values[:, :, tail])
            for b, part in enumerate(layer.parts):
                self.load_part(i, b, part, slots[b], i == 0)
        self.start_state(attention_mask, tok, delta, pad)

    def load_part(self, i: int, b: int, part, slots, first: bool) -> None:
        g, cg, bits = self.g, self.cg, self.bits
        hk, d = self.k[i].shape[1], self.k[i].shape[3]
        at = 0  # tokens of the chunks before
        for c in part.chunks:
            m = c.tokens // g
            kq, ks, kz = triple(c.keys, bits)
            for dst, src in zip((self.kc, self.ks, self.kz), (squeeze(kq, self.per), ks, kz), strict=True):
                dst[i][b, :, at // g : at // g + m] = src.reshape(hk, m, d, -1)
            where = slots[at : at + c.tokens]
            vq, vs, vz = triple(c.values, bits)
            for dst, src in zip((self.vc, self.vs, self.vz), (squeeze(vq, self.per), vs, vz), strict=True):
                dst[i][b][:, where] = src.reshape(hk, c.tokens, d // cg, -1)
            at += c.tokens
        for e, (r, k, v) in enumerate(zip(*part.sinks(), strict=True)):
            self.xk[i][b, :, e] = k
            self.xv[i][b, :, e] = v
            if first:
                self.xmap[b, slots[r]] = e
        if first:
            self.xn[b] = len(part.sink_rank)

    def start_op(self):
        out = super().start_op()
        self.ok.index_fill_(1, (self.start[0] + self.t).view(1), True)
        self.rank.copy_(self.ok.long().cumsum(1) - 1)
        return out

    def layers_op(self, lo: int, hi: int, h, cos, sin, t):
        slot = (self.start[0] + t).view(1)
        for i in range(lo, hi):
            if self.cfg.auto and i == self.cfg.sink_layer:
                self.sink.index_copy_(1, slot, self.sink_score(h) > self.cfg.tau)
            h = self.layer(i, h, cos, sin, slot)
        return h, cos, sin, t

    def layer(self, i: int, h, cos, sin, slot):
        layer = self.layers[i]
        q, k, v = project(layer, h, cos, sin, self.heads, self.kv_heads, self.rope)
        self.k[i].index_copy_(2, slot % self.g, k)
        self.v[i].index_copy_(2, slot % self.g, v)
        kb, vb = self.read(i)
        o = F.scaled_dot_product_attention(
            q,
            kb,
            vb,
            attn_mask=self.ok[:, None, None, :],
            scale=layer.self_attn.scaling,
            enable_gqa=self.heads != self.kv_heads,
        )
        return finish(layer, h, o)

    def read(self, i: int):
        """Layer ``i``'s keys / values [B, Hk, C, D] as ``generate``'s cache assembles them: dequantized
        groups, exact ring where not quantized, exact copies of the quantized sinks."""
        g, cg, bits, dtype = self.g, self.cg, self.bits, self.k[i].dtype
        b, hk, _, d = self.k[i].shape
        cap = self.ok.shape[1]
        codes = spread(self.kc[i], self.per).view(-1, g)
        kq = decode(codes, self.ks[i].view(-1, 1), self.kz[i].view(-1, 1), bits, dtype)
        kq = kq.view(b, hk, -1, d, g)[:, :, :-1].transpose(-1, -2).reshape(b, hk, -1, d)  # rank order
        kq = kq.gather(2, self.rank.clamp(min=0)[:, None, :, None].expand(-1, hk, -1, d))
        codes = spread(self.vc[i], self.per).view(-1, cg)
        vq = decode(codes, self.vs[i].view(-1, 1), self.vz[i].view(-1, 1), bits, dtype)
        vq = vq.view(b, hk, cap + 1, d)[:, :, :cap]
        sealed = self.sealed[:, None, :cap, None]
        kb = torch.where(sealed, kq, self.k[i].index_select(2, self.ring))
        vb = torch.where(sealed, vq, self.v[i].index_select(2, self.ring))
        ent = self.xmap[:, None, :cap, None]
        exact = ent < self.entries
        ent = ent.expand(-1, hk, -1, d)
        kb = torch.where(exact, self.xk[i].gather(2, ent), kb)
        return kb, torch.where(exact, self.xv[i].gather(2, ent), vb)

    def book_op(self, nxt):
        super().book_op(nxt)
        self.seal()

    def seal(self) -> None:
        """Quantize the group this step completed, in every sample where it did (one group at most)."""
        g, cg, bits, e = self.g, self.cg, self.bits, self.entries
        ok, rank, cap = self.ok, self.rank, self.ok.shape[1]
        b, hk, _, d = self.k[0].shape
        complete = sealable(ok, self.sealed[:, :cap], rank, g)
        idx, hit = packed(complete, g)  # [B, g] the group's slots in order (all or none per sample)
        hit = hit[:, :1]
        full = kept_full(self.cfg, ok, self.sink, rank).gather(1, idx) & hit  # [B, g]
        group = torch.where(hit, rank.gather(1, idx[:, :1]) // g, self.kc[0].shape[2] - 1)  # [B, 1]
        slot = torch.where(hit, idx, cap)
        ent = torch.where(full, self.xn[:, None] + full.long().cumsum(1) - 1, e).clamp(max=e)
        self.overflow |= (self.xn + full.sum(1) > e).any()
        ring = (idx % g)[:, None, :, None].expand(-1, hk, -1, d)
        per = self.per
        at_k = group[:, None, :, None, None].expand(-1, hk, 1, d, g // per)
        at_v = slot[:, None, :, None, None].expand(-1, hk, g, d // cg, cg // per)
        at_x = ent[:, None, :, None].expand(-1, hk, -1, d)
        for i in range(len(self.layers)):
            k, v = self.k[i].gather(2, ring), self.v[i].gather(2, ring)  # [B, Hk, g, D] exact
            q, s, z = affine(key_rows(k, full[:, None], g).reshape(-1, g), bits)
            self.kc[i].scatter_(2, at_k, squeeze(q.view(b, hk, 1, d, g), per))
            self.ks[i].scatter_(2, at_k[..., :1], s.view(b, hk, 1, d, 1))
            self.kz[i].scatter_(2, at_k[..., :1], z.view(b, hk, 1, d, 1))
            q, s, z = affine(v.reshape(-1, cg), bits)
            self.vc[i].scatter_(2, at_v, squeeze(q.view(b, hk, g, d // cg, cg), per))
            self.vs[i].scatter_(2, at_v[..., :1], s.view(b, hk, g, d // cg, 1))
            self.vz[i].scatter_(2, at_v[..., :1], z.view(b, hk, g, d // cg, 1))
            self.xk[i].scatter_(2, at_x, k)
            self.xv[i].scatter_(2, at_x, v)
        self.xmap.scatter_(1, torch.where(full, idx, cap), ent)
        self.xn += full.sum(1)
        self.sealed.scatter_(1, slot, True)


def generate_quant(family, handle, p, ids, max_new_tokens: int, graphs: bool, compile: bool, stop):
    """The new tokens [B, n] of greedy decoding over the quantized store after the prefill ``p``
    (``generate_fast``'s: the whole prompt through the model, no hand-off). ``stop``: (end-of-sequence ids,
    pad id). ``compile`` is ignored (the layer step is not compiled)."""
    from .quant import QuantCache

    cfg = handle.kv
    if not isinstance(p.cache, QuantCache):
        raise ValueError("mmsink: generate_fast's quant mode got no quantized cache from the prefill")
    mask = p.mask.bool()
    if not bool((mask.cummax(1).values == mask).all()):  # the rings hold the last g slots of each sample
        raise ValueError("mmsink: generate_fast's kv quant mode needs left-padded prompts (no gaps in masks)")
    stops, pad = stop
    eos = torch.tensor(stops, dtype=torch.long, device=ids.device)
    new = p.tok[:, None]
    if max_new_tokens == 1 or bool(torch.isin(p.tok, eos).all()):
        return new
    steps = max_new_tokens - 1
    cap = -(-(p.cache.valid.shape[1] + steps) // ROUND) * ROUND
    entries = entries_needed(cfg, p.cache, steps)
    cap_new = -(-steps // ROUND) * ROUND
    model = family.model
    params = (model.lm_head.weight.data_ptr(), model.lm_head.weight.dtype)
    key = ("quant", repr(cfg), ids.shape[0], cap, entries, cap_new, stops, graphs, params)
    dec = kept(model, key, lambda: QuantDecoder(family, cfg, cap, entries, ids.shape[0], cap_new, stops))
    delta = family.rope_deltas() if dec.mrope else None
    if graphs and dec.graph is None:
        dec.fill(p.cache, p.mask, p.tok, delta, pad)
        dec.capture()
    dec.fill(p.cache, p.mask, p.tok, delta, pad)
    n = dec.run(steps)
    if bool(dec.overflow):
        raise ValueError(
            f"mmsink: generate_fast's quant store filled up (more than {SPARE_SINKS} decode tokens flagged"
            " as sinks); use model.generate"
        )
    return torch.cat([new, dec.out[:, :n].to(ids.device)], 1)
