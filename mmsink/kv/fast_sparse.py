"""``generate_fast`` with LFPS sparse decoding: ``wrap(model, kv={"sparse": "lfps", "topk": k})``.

The prefill runs through the wrapped model as ``generate``'s does (no hand-off: the kv hooks make the
``SparseCache``, pruners plan as usual), then ``FastDecoder``'s static buffers are filled as for plain
decoding: layer i holds its prefill's slots first and the t-th new token at slot ``n_i + t``, the slot
``generate``'s cache gives it, so the history (previous step's chosen slots, per layer [B, H, k]) means
the same in both. Each layer's attention is ``mmsink.kv.sparse.step``, the function ``generate``'s cache
runs, over the whole buffer: ``length`` (a device counter, ``n_i + t + 1``) bounds the candidates, the
validity mask the rest, top-k is a fixed count; no host sync, no data-dependent shape.

Two step variants, chosen on the host by the step's index (so two CUDA graphs on GPU): the first
``dense_steps`` steps attend to every valid slot (a sort of the buffer), the others to the top ``topk``.
A sparse step reads only its candidates' keys, as ``generate``'s does: whether a sample is short (its
candidates are then its real slots) is decided on the device, where ``generate`` checks on the host once
per step. The layer step is not compiled (``compile`` is ignored in this mode). On CUDA with Triton the
sparse steps run ``mmsink.kv.lfps_triton.sparse_step`` (two kernels, the same choice, the history written
in place) instead of ``step``'s ~30 aten ops; elsewhere, and for the dense steps, ``step``.
"""

from __future__ import annotations

import torch

from ..fast import decode as fast_decode
from ..fast.decode import ROUND, FastDecoder, decode_kv, finish, project, write_slot
from ..fast.store import kept_for
from . import lfps_triton
from .sparse import step as lfps_step


def sparse_layer_step(
    layer, h, cos, sin, kb, vb, ok, slot, hist, dense: bool, cfg, heads, rope, kernel: bool = False
):
    """One decoder layer for one new token: its key / value at ``slot``, LFPS attention over the buffer
    (``hist`` updated in place), the rest of the layer. ``kernel``: a sparse step runs the Triton kernels
    (``mmsink.kv.lfps_triton``: the same choice, two launches) instead of the torch ops."""
    q, k, v = project(layer, h, cos, sin, heads, rope)
    write_slot(kb, vb, ok, k, v, slot)
    scale = layer.self_attn.scaling
    if kernel and not dense:
        out, _ = lfps_triton.sparse_step(
            q[:, :, 0], kb, vb, ok, hist, cfg.topk, cfg.expand, scale, cfg.sinks, slot[0] + 1, out_hist=hist
        )
    else:
        out, nxt = lfps_step(q[:, :, 0], kb, vb, ok, hist, cfg, dense, scale, False, length=slot[0] + 1)
        hist.copy_(nxt)
    return finish(layer, h, out[:, :, None].to(q.dtype))


class SparseDecoder(FastDecoder):
    """``FastDecoder``'s buffers and bookkeeping with the LFPS attention step and its history."""

    def __init__(self, family, cfg, caps: list[int], batch: int, max_new: int, eos: tuple):
        super().__init__(family, caps, batch, max_new, eos, compile=False)
        self.cfg = cfg
        self.hist = [
            torch.full((batch, self.heads, min(cfg.topk, k.shape[2])), -1, dtype=torch.long, device=k.device)
            for k in self.k
        ]
        self.dense = True  # the variant the next step runs (set by ``run``)
        self.kernel = lfps_triton.available(self.k[0].device) if self.k else False  # sparse steps in Triton
        self.replays: dict = {}  # dense -> the captured step

    def fill(self, cache, attention_mask, tok, delta, pad, tail=None) -> None:
        super().fill(cache, attention_mask, tok, delta, pad, tail)
        for h in self.hist:
            h.fill_(-1)

    def layers_op(self, lo: int, hi: int, h, cos, sin, t):
        for i in range(lo, hi):
            h = sparse_layer_step(
                self.layers[i],
                h,
                cos,
                sin,
                self.k[i],
                self.v[i],
                self.valid[i],
                (self.start[i] + t).view(1),
                self.hist[i],
                self.dense,
                self.cfg,
                self.heads,
                self.rope,
                self.kernel,
            )
        return h, cos, sin, t

    def capture(self) -> None:
        """Both variants, one graph each; their warm-up steps are undone by the caller's ``fill``."""
        for dense in (True, False):
            self.dense = dense
            self.replays[dense] = fast_decode.capture_graph(self.step)[1]

    def captured(self) -> bool:
        return bool(self.replays)

    def run(self, steps: int) -> int:
        """``FastDecoder.run`` with the variant of each step: dense for the first ``dense_steps``."""
        for t in range(steps):
            self.dense = t < self.cfg.dense_steps
            if self.replays:
                self.replays[self.dense]()
            else:
                self.step()
            if (t + 1) % 8 == 0 and bool(self.done.all()):
                return t + 1
        return steps


def generate_sparse(family, handle, p, ids, max_new_tokens: int, graphs: bool, compile: bool, stop):
    """The new tokens [B, n] of greedy decoding with LFPS after the prefill ``p`` (``generate_fast``'s:
    the whole prompt through the model, no hand-off). ``stop``: (end-of-sequence ids, pad id)."""
    from .sparse import SparseCache

    def make(steps: int):
        caps = [-(-(layer.keys.shape[2] + steps) // ROUND) * ROUND for layer in p.cache.layers]
        cap_new = -(-steps // ROUND) * ROUND
        key = ("lfps", repr(handle.kv), ids.shape[0], tuple(caps), cap_new, stop[0], graphs)
        args = (family, handle.kv, caps, ids.shape[0], cap_new, stop[0])
        return kept_for(family, key, lambda: SparseDecoder(*args))

    need = (SparseCache, "sparse mode got no LFPS cache")
    return decode_kv(family, p, ids, max_new_tokens, graphs, stop, need, make)[0]
