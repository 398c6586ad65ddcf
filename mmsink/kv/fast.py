"""``generate_fast`` with the sink + window cache: ``wrap(model, kv={"window": W, "sinks": N or "auto"})``.

The prefill runs through the wrapped model as ``generate``'s does (no hand-off: the kv hooks run, the
``WindowCache`` evicts and re-rotates keys to their cache positions, pruners plan as usual). Its cache is
then loaded into fixed-size buffers and every new token is one fixed-shape step (one CUDA-graph replay
on GPU), whose cost does not grow with the conversation: the buffers hold the kept slots only.

Buffers. The stream (what the policy sees, as ``WindowCache``'s fields): ``S`` slots of validity, stream
column, current position (A axes: 3 for M-RoPE) and sink flag. Per segment of layers (one segment
without a pruner; a pruner's plan gives layers that hold different columns, as ``PlanWindowCache``):
``C`` slots of validity, column and the position its raw key was written at; per layer its keys, values
and raw keys (as written). Kept slots sit left-padded in the first ``S - 1`` / ``C - 1`` slots; the
last slot is where the step writes its token.

The step (``book_op`` after the model's layers): the new token's position is ``next_pos`` (all three
axes for M-RoPE: a decode token has the same coordinate on each, as ``generate``'s hooks give it), its
key / value / raw key go to the last slot, SDPA over the valid slots; "auto" scores the ``sink_layer``
input of the token and flags it (as ``generate`` does for every new token). Then the eviction, on the
device with no host sync: ``policy`` over the stream, the kept slots left-packed by a sort (always the
same width: when nothing goes it is an identity), ``compact`` for the new positions, each segment keeps
its slots whose column is kept, and its raw keys are rotated by ``new - written`` (``turn_of`` /
``rotate`` of ``mmsink.kv.window``: the same fp32 arithmetic as ``generate``, so keys equal bitwise);
``next_pos`` = largest kept position + 1. ``generate`` evicts only when some sample drops a slot; the
step always runs it: a sample whose positions are already compact (before its first eviction its
positions are the model's own, one run from 0) maps to itself and its keys rotate by 0 (exact).

Sizes: ``S - 1`` = the kept slots after the prefill plus the new tokens, at most ``first + window``
(+ the prefill's flagged sinks + ``SPARE_SINKS`` with "auto"): decode tokens flagged as sinks beyond
that would need more, which the step records and ``generate_fast`` then refuses with one line rather
than returning tokens ``generate`` would not give.

Not done here: a model split over devices and ``step=`` options (refused), ring-buffer keys (each step
re-rotates the window's keys: O(window), as ``generate``), the prefill's hand-off to graphed tail layers
and the graphed vision tower (the prefill runs eagerly, as ``generate``'s).
"""

from __future__ import annotations

import torch

from ..fast.decode import ROUND, FastDecoder, decode_kv
from ..fast.store import kept_for
from .window import compact, policy, rotate, turn_of

SPARE_SINKS = 32  # "auto": decode tokens that may be flagged as sinks before the buffers are full


def packed(keep: torch.Tensor, width: int):
    """(idx [B, width], valid [B, width]): the True slots of ``keep`` in order, left-padded (a sort: no
    host sync, the same width whatever is kept)."""
    t = keep.shape[1]
    score = torch.where(keep, torch.arange(t, device=keep.device), -1)
    sel = score.sort(1).values[:, t - width :]
    return sel.clamp(min=0), sel >= 0


def layout(cache):
    """(segment of each layer, per segment (valid [B, T], column [B, T], raw position [B, T])) of a
    window cache after its prefill."""
    segs = getattr(cache, "seg_origin", None)
    if segs:  # a pruned prefill: PlanWindowCache's segments
        parts = [
            (v, o, p[..., 0])
            for v, o, p in zip(cache.segment_valid, cache.seg_origin, cache.seg_pos, strict=True)
        ]
        return list(cache.layer_segment), parts
    return [0] * len(cache.layers), [(cache.valid, cache.origin, cache.orig_pos[..., 0])]


def sizes(cfg, cache, steps: int, parts) -> tuple[int, list[int]]:
    """(stream slots S, per segment slots C): what the step can ever hold, plus the write slot."""
    k0 = cache.valid.shape[1]
    bound = cfg.first + cfg.window
    if cfg.auto:
        bound += int(cache.sink.sum(1).max()) + min(steps, SPARE_SINKS)
    s0 = max(k0, min(k0 + steps, bound))
    segs = [min(v.shape[1] + steps, s0) + 1 for v, _, _ in parts]
    return s0 + 1, segs


class WindowDecoder(FastDecoder):
    """``FastDecoder``'s step (the model's modules, SDPA over a static buffer, argmax, bookkeeping) with
    the sink + window eviction after every token."""

    def __init__(
        self,
        family,
        cfg,
        inv_freq,
        stream: int,
        segs: list[int],
        layer_seg: list[int],
        batch,
        max_new,
        eos,
        compile,
    ):
        caps = [segs[s] for s in layer_seg]
        super().__init__(family, caps, batch, max_new, eos, compile)
        self.cfg, self.layer_seg = cfg, list(layer_seg)
        dev = self.embed.weight.device
        self.inv_freq = inv_freq.to(dev)
        self.axes = 3 if self.mrope else 1
        self.raw = [torch.zeros_like(k) for k in self.k]
        self.s_valid = torch.zeros(batch, stream, dtype=torch.bool, device=dev)
        self.s_origin = torch.full((batch, stream), -1, dtype=torch.long, device=dev)
        self.s_pos = torch.zeros(batch, stream, self.axes, dtype=torch.long, device=dev)
        self.s_sink = torch.zeros(batch, stream, dtype=torch.bool, device=dev)
        self.g_valid = [torch.zeros(batch, c, dtype=torch.bool, device=dev) for c in segs]
        self.g_origin = [torch.full((batch, c), -1, dtype=torch.long, device=dev) for c in segs]
        self.g_pos = [torch.zeros(batch, c, dtype=torch.long, device=dev) for c in segs]
        self.valid = [self.g_valid[s] for s in layer_seg]  # a layer's mask is its segment's validity
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.col = torch.zeros((), dtype=torch.long, device=dev)  # the new token's stream column
        self.overflow = torch.zeros((), dtype=torch.bool, device=dev)
        self.dims = torch.tensor(cfg.sink_dims or (0,), dtype=torch.long, device=dev)
        self.last = [torch.tensor([k.shape[2] - 1], device=k.device) for k in self.k]  # the write slot

    def fill(self, cache, attention_mask, tok, delta, pad, tail=None) -> None:
        layer_seg, parts = layout(cache)
        if layer_seg != self.layer_seg:
            raise ValueError("mmsink: the window cache's layer segments differ from the decoder's")
        for buf in (*self.k, *self.v, *self.raw):
            buf.zero_()
        n = cache.valid.shape[1]
        s = self.s_valid.shape[1] - 1
        self.s_valid.zero_()
        self.s_origin.fill_(-1)
        self.s_pos.zero_()
        self.s_sink.zero_()
        self.s_valid[:, s - n : s] = cache.valid
        self.s_origin[:, s - n : s] = cache.origin
        self.s_pos[:, s - n : s] = cache.pos
        self.s_sink[:, s - n : s] = cache.sink
        for g, (valid, origin, pos) in enumerate(parts):
            c, m = self.g_valid[g].shape[1] - 1, valid.shape[1]
            self.g_valid[g].zero_()
            self.g_origin[g].fill_(-1)
            self.g_pos[g].zero_()
            self.g_valid[g][:, c - m : c] = valid
            self.g_origin[g][:, c - m : c] = torch.where(valid, origin, -1)
            self.g_pos[g][:, c - m : c] = pos
        for i, layer in enumerate(cache.layers):
            c, m = self.k[i].shape[2] - 1, layer.keys.shape[2]
            self.k[i][:, :, c - m : c] = layer.keys
            self.v[i][:, :, c - m : c] = layer.values
            self.raw[i][:, :, c - m : c] = layer.raw
        if cache.compacted:
            self.next_pos.copy_(cache.next_pos[:, 0])
        else:  # the model's own next position (as FastDecoder's: mask count, + Qwen's rope delta)
            nxt = attention_mask.long().sum(1)
            self.next_pos.copy_(nxt + delta[:, 0] if delta is not None else nxt)
        self.col.fill_(cache.seen)
        self.overflow.zero_()
        self.start_state(attention_mask, tok, delta, pad)

    def start_op(self):
        h = self.embed(self.tok[:, None])
        pos = self.next_pos[:, None]
        self.s_valid[:, -1].fill_(True)
        self.s_origin[:, -1] = self.col
        self.s_pos[:, -1] = pos
        self.s_sink[:, -1].fill_(False)
        for valid, origin, gpos in zip(self.g_valid, self.g_origin, self.g_pos, strict=True):
            valid[:, -1].fill_(True)
            origin[:, -1] = self.col
            gpos[:, -1] = self.next_pos
        if self.mrope:
            pos = pos.expand(3, -1, -1)
        cos, sin = self.rotary(h, pos)
        return h, cos, sin, self.t

    def layers_op(self, lo: int, hi: int, h, cos, sin, t):
        for i in range(lo, hi):
            if self.cfg.auto and i == self.cfg.sink_layer:
                self.s_sink[:, -1] = (self.sink_score(h) > self.cfg.tau)[:, -1]
            kb = self.k[i]
            h = self.layer_fn(
                self.layers[i],
                h,
                cos,
                sin,
                kb,
                self.v[i],
                self.valid[i],
                self.last[i],
                self.heads,
                self.kv_heads,
                self.rope,
            )
            self.raw[i][:, :, -1] = kb[:, :, -1]  # the key as written (rotated at its position)
        return h, cos, sin, t

    def sink_score(self, h):
        """``mmsink.sinks.var.sink_scores`` (the same arithmetic) with the channels as a device tensor: no
        host-built index inside the step."""
        x = h.float()
        rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        return (x.index_select(-1, self.dims).abs() / rms).amax(-1)

    def book_op(self, nxt):
        super().book_op(nxt)
        self.evict()

    def evict(self) -> None:
        """Keep the sinks and the window of the stream (its last slot is this step's token), left-packed
        into the first ``S - 1`` slots; every segment the same columns, raw keys rotated to the new
        positions."""
        s = self.s_valid.shape[1]
        keep = policy(self.s_valid, self.s_sink, self.cfg.first, self.cfg.window)
        self.overflow |= (keep.sum(1) > s - 1).any()
        idx, valid = packed(keep, s - 1)
        origin = torch.where(valid, self.s_origin.gather(1, idx), -1)
        pos = compact(self.s_pos.gather(1, idx[..., None].expand(-1, -1, self.axes)), origin, valid)
        new_of = pos.new_zeros(idx.shape[0], s + 1)  # old slot -> its new position (axis 0)
        new_of = new_of.scatter(1, torch.where(valid, idx, s), pos[..., 0])[:, :s]
        for g in range(len(self.g_valid)):
            self.evict_segment(g, keep, new_of)
        self.s_valid[:, :-1] = valid
        self.s_valid[:, -1].fill_(False)
        self.s_origin[:, :-1] = origin
        self.s_pos[:, :-1] = torch.where(valid[..., None], pos, 0)
        self.s_sink[:, :-1] = self.s_sink.gather(1, idx) & valid
        self.s_sink[:, -1].fill_(False)
        self.next_pos.copy_(torch.where(valid[..., None], pos, -1).amax((1, 2)) + 1)
        self.col += 1

    def evict_segment(self, g: int, keep, new_of) -> None:
        gv, go, gp = self.g_valid[g], self.g_origin[g], self.g_pos[g]
        c = gv.shape[1]
        j = torch.searchsorted(self.s_origin, go.clamp(min=0)).clamp(max=self.s_origin.shape[1] - 1)
        idx, valid = packed(gv & keep.gather(1, j), c - 1)
        written = gp.gather(1, idx)
        new = new_of.gather(1, j.gather(1, idx))
        cos, sin = turn_of(torch.where(valid, new - written, 0), self.inv_freq)
        for i, seg in enumerate(self.layer_seg):
            if seg != g:
                continue
            rows = idx[:, None, :, None].expand(-1, self.raw[i].shape[1], -1, self.raw[i].shape[-1])
            raw = self.raw[i].gather(2, rows)
            self.v[i][:, :, :-1] = self.v[i].gather(2, rows)
            self.raw[i][:, :, :-1] = raw
            rotate(raw, cos, sin, out=self.k[i][:, :, :-1])
        origin = torch.where(valid, go.gather(1, idx), -1)
        gv[:, :-1] = valid
        gv[:, -1].fill_(False)
        go[:, :-1] = origin
        go[:, -1].fill_(-1)
        gp[:, :-1] = torch.where(valid, written, 0)


def window_decoder(family, cfg, inv_freq, cache, batch: int, steps: int, eos, graphs: bool, compile: bool):
    """A decoder for this cache's layout, kept on the model by shape (as ``decoder_for``'s)."""
    layer_seg, parts = layout(cache)
    stream, segs = sizes(cfg, cache, steps, parts)
    stream = -(-stream // ROUND) * ROUND
    segs = [-(-c // ROUND) * ROUND for c in segs]
    new = -(-steps // ROUND) * ROUND
    key = ("window", repr(cfg), batch, stream, tuple(segs), tuple(layer_seg), new, eos, graphs, compile)
    args = (family, cfg, inv_freq, stream, segs, layer_seg, batch, new, eos, compile)
    return kept_for(family, key, lambda: WindowDecoder(*args))


def generate_window(family, handle, p, ids, max_new_tokens: int, graphs: bool, compile: bool, stop):
    """The new tokens [B, n] of greedy decoding with the window cache (see the module docstring) after
    the prefill ``p`` (``generate_fast``'s: the whole prompt through the model, no hand-off, eager vision
    tower, so the kv hooks evicted there). ``stop``: (end-of-sequence ids, pad id)."""
    from .window import WindowCache

    inv_freq = family.language_model.rotary_emb.inv_freq

    def make(steps: int):
        b = ids.shape[0]
        return window_decoder(family, handle.kv, inv_freq, p.cache, b, steps, stop[0], graphs, compile)

    need = (WindowCache, "window mode got no window cache")
    new, dec = decode_kv(family, p, ids, max_new_tokens, graphs, stop, need, make)
    if dec is not None and bool(dec.overflow):
        raise ValueError(
            f"mmsink: generate_fast's window buffers filled up (more than {SPARE_SINKS} decode tokens flagged"
            " as sinks); use model.generate"
        )
    return new
