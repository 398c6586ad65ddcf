"""The sink + window cache over a pruned prefill: ``wrap(model, prune=..., kv={"window": W})``.

A pruner leaves layers holding different token sets (segments of mmsink's PlanCache). The window's
policy runs on the stream, as without pruning: the kept columns are the first ``first`` real columns,
the flagged sinks and the last ``window`` columns, pruned ones included (a pruned token still takes its
place in the window; a deep layer holds the kept columns it has). Positions too are the stream's: a
column's new position is its position in the compacted stream (``compact``), the same in every layer,
so the gaps pruning leaves stay gaps. Each segment then keeps its slots whose column is kept and
re-rotates their raw keys to those positions. After the first eviction every segment's mask is built
from its own slots (``segment_full`` off).

``PlanQuantCache``: the quantized cache over a pruned prefill (``kv={"quant": ...}``), no eviction.
"""

from __future__ import annotations

import torch

from ..core.cache import PlanCache
from .quant import QuantCache, seal_layer, seal_plan, sealable
from .store import QuantLayer
from .window import WindowCache, WindowLayer, turn_of


def left_packed(keep: torch.Tensor):
    """(idx [B, K], valid [B, K]): the True slots of ``keep`` in order, left-padded (K >= 1)."""
    t = keep.shape[1]
    score = torch.where(keep, torch.arange(t, device=keep.device), -1)
    k = max(int(keep.sum(1).max()), 1)
    sel = score.sort(1).values[:, t - k :]
    return sel.clamp(min=0), sel >= 0


class PlanWindowCache(WindowCache, PlanCache):
    """PlanCache's per-segment slots with the window's stream bookkeeping. Per segment s also
    ``seg_origin[s]`` [B, T_s] (the stream column of each slot, -1 on padding) and ``seg_pos[s]``
    [B, T_s, A] (the position its raw key was written at)."""

    def __init__(self, cfg, inv_freq: torch.Tensor):
        PlanCache.__init__(self)
        self.layer_class_to_replicate = WindowLayer
        self.init_window(cfg, inv_freq)
        self.seg_origin: list = []
        self.seg_pos: list = []
        self.prefill = None  # the handle's Prefill while the pruned prefill runs (its segments)

    def begin(self, new_valid, positions) -> None:
        super().begin(new_valid, positions)
        q = self.step_q
        if self.seg_origin:  # a decode step: every segment takes the new tokens (Decode.start did valid)
            self.seg_origin = [torch.cat([o, self.origin[:, -q:].to(o.device)], 1) for o in self.seg_origin]
            self.seg_pos = [torch.cat([p, self.pos[:, -q:].to(p.device)], 1) for p in self.seg_pos]

    def set_positions(self, positions) -> None:
        super().set_positions(positions)
        q = positions.shape[1]
        if self.seg_origin:
            self.seg_pos = [torch.cat([p[:, :-q], self.pos[:, -q:].to(p.device)], 1) for p in self.seg_pos]

    def end(self, q: int) -> None:
        if self.prefill is not None:  # the pruned prefill is over: its segments map slots to columns
            for seg in self.prefill.segments:
                idx = seg.idx.to(self.origin.device)
                self.seg_origin.append(torch.where(seg.valid.to(idx.device), idx, -1))
                rows = idx[..., None].expand(-1, -1, self.pos.shape[-1])
                self.seg_pos.append(self.pos.gather(1, rows))
            self.prefill = None
        super().end(q)

    def evict(self) -> None:
        if not self.seg_origin:  # a forward the plan machinery did not run (no image): one segment
            return super().evict()
        kept = self.kept_slots()
        if kept is None:
            return
        idx, valid = kept
        origin, orig, pos = self.compacted_stream(idx, valid)
        t = self.valid.shape[1]
        keep = self.valid.new_zeros(self.valid.shape[0], t + 1).scatter(1, torch.where(valid, idx, t), True)
        keep = keep[:, :t]
        spare = torch.where(valid, idx, t)[..., None].expand_as(pos)
        new_of = pos.new_zeros(pos.shape[0], t + 1, pos.shape[-1]).scatter(1, spare, pos)  # old slot -> new
        for s in range(len(self.seg_origin)):
            self.evict_segment(s, keep, new_of)
        self.segment_full = [False] * len(self.segment_full)
        self.settle(idx, valid, origin, orig, pos)

    def evict_segment(self, s: int, keep, new_of) -> None:
        o, sv = self.seg_origin[s], self.segment_valid[s]
        j = torch.searchsorted(self.origin, o.clamp(min=0)).clamp(max=self.origin.shape[1] - 1)
        idx, valid = left_packed(sv & keep.gather(1, j))
        orig = self.seg_pos[s].gather(1, idx[..., None].expand(-1, -1, self.seg_pos[s].shape[-1]))
        new = new_of.gather(1, j.gather(1, idx)[..., None].expand_as(orig))
        turn = turn_of(torch.where(valid, new[..., 0] - orig[..., 0], 0), self.inv_freq)
        for layer, seg in zip(self.layers, self.layer_segment, strict=True):
            if seg == s:
                layer.keep(idx, turn)
        self.seg_origin[s] = torch.where(valid, o.gather(1, idx), -1)
        self.seg_pos[s], self.segment_valid[s] = orig, valid

    def kept_origins_of(self, layer: int) -> list[list[int]]:
        """Per sample, the stream columns layer ``layer`` holds."""
        s = self.layer_segment[layer]
        return [o[v].tolist() for o, v in zip(self.seg_origin[s], self.segment_valid[s], strict=True)]

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self.seg_origin = [o.index_select(0, beam_idx.to(o.device)) for o in self.seg_origin]
        self.seg_pos = [p.index_select(0, beam_idx.to(p.device)) for p in self.seg_pos]

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.seg_origin = [o.repeat_interleave(repeats, 0) for o in self.seg_origin]
        self.seg_pos = [p.repeat_interleave(repeats, 0) for p in self.seg_pos]

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.seg_origin = [o[indices] for o in self.seg_origin]
        self.seg_pos = [p[indices] for p in self.seg_pos]


class PlanQuantCache(QuantCache, PlanCache):
    """The quantized cache after a pruned prefill: ``wrap(model, prune=..., kv={"quant": ...})``. Each
    layer stores the slots of its segment (PlanCache's ``segment_valid``); token groups follow the ranks
    of the tokens that layer holds (a pruned layer seals its groups sooner in the stream), while the
    tokens kept in full precision are the stream's (its first ``first`` real columns and the flagged
    sinks), whichever layers hold them. Nothing is evicted: stream slots stay stream columns."""

    def __init__(self, cfg, inv_freq: torch.Tensor):
        PlanCache.__init__(self)
        self.layer_class_to_replicate = QuantLayer
        self.init_window(cfg, inv_freq)
        self.done = None
        self.forward_state()
        self.seg_origin: list = []  # segment -> [B, T_s] stream column of each slot (-1 on padding)
        self.seg_done: list = []  # segment -> [B, T_s] slots already quantized
        self.prefill = None  # the handle's Prefill while the pruned prefill runs (its segments)

    def slot_valid(self, layer_idx: int) -> torch.Tensor:
        """[B, T_s] the slots layer ``layer_idx`` holds (its segment's, during the prefill or after)."""
        if self.prefill is not None:  # the plan appends a layer's segment before the layer runs
            p = self.prefill
            return p.segments[p.layer_segment[layer_idx]].valid
        if self.layer_segment:
            return self.segment_valid[self.layer_segment[layer_idx]]
        return self.valid  # a forward the plan did not run (no image): the stream's slots

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(QuantLayer())
        valid = self.slot_valid(layer_idx)
        return self.layers[layer_idx].put(key_states, value_states, valid, self.cfg.group_size)

    def begin(self, new_valid, positions) -> None:
        super().begin(new_valid, positions)
        q = self.step_q
        if self.seg_origin:  # a decode step: every segment takes the new columns (Decode.start did valid)
            cols = self.origin[:, -q:]
            self.seg_origin = [torch.cat([o, cols.to(o.device)], 1) for o in self.seg_origin]

    def end(self, q: int) -> None:
        if self.prefill is not None:  # the pruned prefill is over: its segments map slots to columns
            for seg in self.prefill.segments:
                idx = seg.idx.to(self.origin.device)
                self.seg_origin.append(torch.where(seg.valid.to(idx.device), idx, -1))
            self.prefill = None
        super().end(q)

    def evict(self) -> None:
        if not self.layer_segment:
            return super().evict()
        g, bits = self.cfg.group_size, self.cfg.bits
        rank = self.valid.long().cumsum(1) - 1
        full_col = self.kept_full(rank)  # [B, T] by stream column
        while len(self.seg_done) < len(self.segment_valid):
            self.seg_done.append(None)
        for s, valid in enumerate(self.segment_valid):
            if s not in self.layer_segment:  # a segment no layer runs on (e.g. aliased by unmask)
                continue
            done = self.seg_done[s]
            done = torch.zeros_like(valid) if done is None else done
            if done.shape[1] < valid.shape[1]:
                done = torch.cat([done, done.new_zeros(done.shape[0], valid.shape[1] - done.shape[1])], 1)
            complete = sealable(valid, done, valid.long().cumsum(1) - 1, g)
            origin = self.seg_origin[s].to(full_col.device)
            full = full_col.gather(1, origin.clamp(min=0)) & valid
            plan, memo = seal_plan(complete, full), {}
            for layer, seg in zip(self.layers, self.layer_segment, strict=True):
                if seg == s:
                    seal_layer(layer, plan, g, bits, memo)
            self.seg_done[s] = done | complete
        self.forward_state()

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self.map_segments(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.map_segments(lambda x: x.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.map_segments(lambda x: x[indices])

    def map_segments(self, fn) -> None:
        self.seg_origin = [fn(o) for o in self.seg_origin]
        self.seg_done = [None if d is None else fn(d) for d in self.seg_done]
