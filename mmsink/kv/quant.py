"""KV quantization that keeps the sinks in full precision (KVSink, Su & Yuan, COLM 2025), fake-quantized.

Keys are quantized per channel over groups of ``group_size`` tokens, values per token over groups of
``group_size`` channels (KIVI's axes), asymmetric min-max at ``bits``. A group of tokens is quantized
once it is complete (its newest tokens stay in full precision until then, KIVI's residual), at the end of
the forward that completes it, in every layer. Sink tokens (the first ``first`` real tokens: the
paper's Preserve-First-N baseline; with ``"auto"`` also the tokens flagged by the massive-activation
detector: KVSink) stay bitwise in full precision and are left out of the scales. Groups follow each
sample's own token ranks, so left padding does not move them (batched == per sample).

Fake quantization: the cache stores the dequantized values (the accuracy of the format, not its
memory). transformers' ``QuantizedCache`` stores real low-bit tensors through optimum-quanto or HQQ but
quantizes every token past its residual window with no way to leave sinks out of the scales.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .window import WindowCache


def fake_quant(x: torch.Tensor, gid: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Quantize-dequantize x [B, H, T, D] where ``gid`` [B, H, T, D] >= 0, min-max per group id along
    ``axis`` (the group's members share a scale and zero point); entries with gid < 0 are untouched."""
    sel = gid >= 0
    idx = gid.clamp(min=0)
    n = int(idx.amax()) + 1 if bool(sel.any()) else 0
    if n == 0:
        return x
    shape = list(x.shape)
    shape[axis] = n
    xf = x.float()
    inf = torch.tensor(float("inf"), device=x.device)
    lo = torch.full(shape, float("inf"), device=x.device).scatter_reduce(
        axis, idx, torch.where(sel, xf, inf), "amin"
    )
    hi = torch.full(shape, float("-inf"), device=x.device).scatter_reduce(
        axis, idx, torch.where(sel, xf, -inf), "amax"
    )
    lo, hi = lo.gather(axis, idx), hi.gather(axis, idx)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp(min=1e-12)
    deq = ((xf - lo) / scale).round().clamp(0, levels) * scale + lo
    return torch.where(sel, deq.to(x.dtype), x)


class QuantCache(WindowCache):
    """The window cache's bookkeeping (validity, sink flags) with no eviction: after each forward the
    complete token groups are fake-quantized in every layer."""

    layer_class = DynamicLayer

    def __init__(self, cfg, inv_freq):
        super().__init__(cfg, inv_freq)
        self.done = None  # [B, T] slots already quantized (or sinks of quantized groups)

    def evict(self) -> None:
        g, bits = self.cfg.group_size, self.cfg.bits
        valid = self.valid
        done = torch.zeros_like(valid) if self.done is None else self.done
        if done.shape[1] < valid.shape[1]:
            done = torch.cat([done, done.new_zeros(done.shape[0], valid.shape[1] - done.shape[1])], 1)
        rank = valid.long().cumsum(1) - 1
        complete = valid & (rank // g < valid.sum(1, keepdim=True) // g) & ~done
        keep = self.kept_full(rank)
        todo = complete & ~keep
        if bool(todo.any()):
            for layer in self.layers:
                if layer.is_initialized and layer.keys.numel():
                    self.quantize_layer(layer, todo, rank, g, bits)
        self.done = done | complete

    def kept_full(self, rank: torch.Tensor) -> torch.Tensor:
        """[B, T] slots kept in full precision: sinks (none when ``keep_sinks`` is off)."""
        if not self.cfg.keep_sinks:
            return torch.zeros_like(self.valid)
        return self.valid & ((rank < self.cfg.first) | self.sink)

    @staticmethod
    def quantize_layer(layer, todo, rank, g: int, bits: int) -> None:
        k, v = layer.keys, layer.values
        b, h, t, d = k.shape
        dev = k.device
        todo, rank = todo.to(dev), rank.to(dev)
        # keys: one scale per (sample, head, token group, channel)
        gid = torch.where(todo, rank // g, -1)[:, None, :, None].expand(b, h, t, d)
        layer.keys = fake_quant(k, gid, bits, axis=2)
        # values: one scale per (sample, head, token, channel group)
        cg = min(g, d)
        vg = torch.arange(d, device=dev) // cg
        gid = torch.where(todo[:, None, :, None], vg, -1).expand(b, h, t, d)
        layer.values = fake_quant(v, gid, bits, axis=3)

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
