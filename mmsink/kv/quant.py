"""KV quantization that keeps the sinks in full precision (KVSink, Su & Yuan, COLM 2025).

Keys are quantized per channel over groups of ``group_size`` tokens, values per token over groups of
``group_size`` channels (KIVI's axes), asymmetric min-max at ``bits``. A group of tokens is quantized
once it is complete (its newest tokens stay in full precision until then, KIVI's residual), at the end of
the forward that completes it, in every layer. Sink tokens (the first ``first`` real tokens: the
paper's Preserve-First-N baseline; with ``"auto"`` also the tokens flagged by the massive-activation
detector: KVSink) stay bitwise in full precision and are left out of the scales. Groups follow each
sample's own token ranks, so left padding does not move them (batched == per sample).

Storage is real low-bit (``mmsink.kv.store``): packed 2 / 4-bit codes through optimum-quanto, 8 / 16
bits by hand; the attention input is dequantized per forward.
"""

from __future__ import annotations

import torch

from .store import QuantLayer, seal
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


class QuantCache(WindowCache):
    """The window cache's bookkeeping (validity, sink flags) with no eviction: after each forward the
    complete token groups move into low-bit storage in every layer."""

    layer_class = QuantLayer

    def __init__(self, cfg, inv_freq):
        super().__init__(cfg, inv_freq)
        self.done = None  # [B, T] slots already quantized (or sinks of quantized groups)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(QuantLayer())
        return self.layers[layer_idx].put(key_states, value_states, self.valid, self.cfg.group_size)

    def evict(self) -> None:
        g, bits = self.cfg.group_size, self.cfg.bits
        valid = self.valid
        done = torch.zeros_like(valid) if self.done is None else self.done
        if done.shape[1] < valid.shape[1]:
            done = torch.cat([done, done.new_zeros(done.shape[0], valid.shape[1] - done.shape[1])], 1)
        rank = valid.long().cumsum(1) - 1
        complete = sealable(valid, done, rank, g)
        full = self.kept_full(rank)
        for b in range(valid.shape[0]):
            new = complete[b].nonzero()[:, 0]  # the tail's first tokens, in rank order
            if len(new):
                for layer in self.layers:
                    if layer.is_initialized:
                        seal(layer.parts[b], len(new), full[b, new].to(layer.parts[b].tail_k.device), g, bits)
        self.done = done | complete

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
