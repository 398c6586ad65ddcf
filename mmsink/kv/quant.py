"""KV quantization that keeps the sinks in full precision (KVSink, Su & Yuan, COLM 2025).

Keys are quantized per channel over groups of ``group_size`` tokens, values per token over groups of
``group_size`` channels (KIVI's axes), asymmetric min-max at ``bits``. A group of tokens is quantized
once it is complete (its newest tokens stay in full precision until then, KIVI's residual), at the end of
the forward that completes it, in every layer. Sink tokens (the first ``first`` real tokens: the
paper's Preserve-First-N baseline; with ``"auto"`` also the tokens flagged by the massive-activation
detector: KVSink) stay bitwise in full precision and are left out of the scales. Groups follow each
sample's own token ranks, so left padding does not move them (batched == per sample).

A layer's complete groups are quantized right after it takes the forward's tokens (its attention input is
a separate tensor), so a prefill holds at most one layer's full-precision keys / values beyond the
tails; with ``"auto"`` the layers before ``sink_layer`` wait for the prompt's flags (the same values: only
the moment changes). Quantizing at the end of the forward instead kept every layer's prompt in full
precision until then.

Storage is real low-bit (``mmsink.kv.store``): packed 2 / 4-bit codes through optimum-quanto, 8 / 16
bits by hand; the attention input is dequantized per forward.
"""

from __future__ import annotations

import torch

from .store import QuantLayer, picked, seal_all
from .window import WindowCache


def sealable(valid: torch.Tensor, done: torch.Tensor, rank: torch.Tensor, g: int) -> torch.Tensor:
    """[B, T] slots to quantize now: members of complete groups (by the sample's own token ranks ``rank``)
    not quantized yet (``done``)."""
    return valid & (rank // g < valid.sum(1, keepdim=True) // g) & ~done


def kept_full(cfg, valid: torch.Tensor, sink: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """[B, T] slots kept in full precision: the first ``first`` real tokens and the flagged sinks (none
    when ``keep_sinks`` is off)."""
    if not cfg.keep_sinks:
        return torch.zeros_like(valid)
    return valid & ((rank < cfg.first) | sink)


def seal_plan(complete: torch.Tensor, full: torch.Tensor):
    """Per sample: (tokens to quantize, their kept-full flags [n], the flags' positions) of ``complete`` /
    ``full`` [B, T] (the complete slots are a sample's oldest unquantized ones). Two host reads for the
    batch."""
    counts = complete.sum(1).tolist()
    flags = full[complete]
    hits = flags.nonzero()[:, 0].tolist()
    out, lo, j = [], 0, 0
    for n in counts:
        at = []
        while j < len(hits) and hits[j] < lo + n:
            at.append(hits[j] - lo)
            j += 1
        out.append((n, flags[lo : lo + n], at))
        lo += n
    return out


def seal_layer(layer, plan, g: int, bits: int, memo: dict | None = None) -> None:
    if layer.is_initialized:
        seal_all(layer.parts, plan, g, bits, memo)


class QuantCache(WindowCache):
    """The window cache's bookkeeping (validity, sink flags) with no eviction: after each forward the
    complete token groups move into low-bit storage in every layer, each layer as soon as it has taken the
    forward's tokens and the flags are final."""

    layer_class = QuantLayer

    def __init__(self, cfg, inv_freq):
        super().__init__(cfg, inv_freq)
        self.done = None  # [B, T] slots already quantized (or sinks of quantized groups)
        self.forward_state()

    def forward_state(self) -> None:
        self.pick = None  # this forward's (flat index, counts) of the new valid slots
        self.plan = None  # this forward's seal_plan (once the flags are final)
        self.memo: dict = {}  # what its layers' sealing shares
        self.complete = None
        self.waiting: list[int] = []  # layers that took this forward's tokens, not quantized yet
        self.sealed: set[int] = set()  # layers quantized during this forward
        self.final = not (self.cfg.keep_sinks and self.cfg.auto)  # "auto": at the sink layer's flags

    def begin(self, new_valid, positions) -> None:
        super().begin(new_valid, positions)
        self.forward_state()

    def flag(self, is_sink) -> None:
        super().flag(is_sink)
        self.final = True

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(QuantLayer())
        q = key_states.shape[2]
        if self.pick is None or self.pick[2] != q:
            self.pick = (*picked(self.valid[:, -q:]), q)
        layer = self.layers[layer_idx]
        out = layer.put(key_states, value_states, self.valid, self.cfg.group_size, self.pick[:2])
        if self.step_q:  # inside a hooked forward: quantize now (else at evict)
            self.waiting.append(layer_idx)
            if self.final:
                self.seal_waiting()
        return out

    def seal_waiting(self) -> None:
        if self.plan is None:
            valid = self.valid
            done = torch.zeros_like(valid) if self.done is None else self.done
            if done.shape[1] < valid.shape[1]:
                done = torch.cat([done, done.new_zeros(done.shape[0], valid.shape[1] - done.shape[1])], 1)
            rank = valid.long().cumsum(1) - 1
            self.complete = sealable(valid, done, rank, self.cfg.group_size)
            self.done_before = done
            self.plan = seal_plan(self.complete, self.kept_full(rank))
        for i in self.waiting:
            seal_layer(self.layers[i], self.plan, self.cfg.group_size, self.cfg.bits, self.memo)
        self.sealed.update(self.waiting)
        self.waiting = []

    def evict(self) -> None:
        # the layers not quantized during the forward (all of them when it was not hooked)
        self.waiting = [i for i in range(len(self.layers)) if i not in self.sealed]
        self.seal_waiting()
        self.done = self.done_before | self.complete
        self.forward_state()

    def kept_full(self, rank: torch.Tensor) -> torch.Tensor:
        """[B, T] slots kept in full precision: sinks (none when ``keep_sinks`` is off)."""
        return kept_full(self.cfg, self.valid, self.sink, rank)

    def nbytes(self) -> int:
        """Bytes the layers hold (codes, scales, full-precision tails and sinks)."""
        return sum(layer.nbytes() for layer in self.layers if layer.is_initialized)

    # beam search / batch edits carry the quantized-slot flags
    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        if self.done is not None:
            self.done = self.done.index_select(0, beam_idx.to(self.done.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.done is not None:
            self.done = self.done.repeat_interleave(repeats, 0)

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        if self.done is not None:
            self.done = self.done[indices]
