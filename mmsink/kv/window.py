"""The sink + window KV cache (StreamingLLM, Xiao et al., ICLR 2024).

After every forward each sample keeps its first ``first`` real tokens (the paper's sinks), the tokens the
massive-activation detector flagged (``"auto"``), and its last ``window`` real tokens; the middle is
evicted. Positions live inside the cache: a kept token's rotary position becomes its rank among the
sample's kept tokens (0, 1, ...), and the next token's position is the number of kept tokens, so
positions stay below first + sinks + window + 1 however long generation runs.

Keys are re-rotated, not recomputed: each layer also holds its keys as they were written (``raw``, at
the position ``orig_pos`` they were written at) and an eviction rotates those by ``new - orig`` once, so
repeated shifts do not pile up rounding (keys cost twice their memory; values are not copied). Slots
are shared by all layers (no per-layer pruning), left-padded per sample like a padded prompt.

Until the first eviction nothing differs from transformers' cache: same slots, positions and mask.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class WindowLayer(DynamicLayer):
    """A dynamic layer that also keeps its keys as written, for exact re-rotation after evictions."""

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.raw = self.keys

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.raw = torch.cat([self.raw, key_states], dim=-2)
        return super().update(key_states, value_states, *args, **kwargs)

    def reorder_cache(self, beam_idx) -> None:
        if self.get_seq_length() > 0:
            self.raw = self.raw.index_select(0, beam_idx.to(self.raw.device))
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self.raw = self.raw.repeat_interleave(repeats, dim=0)
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        if self.get_seq_length() > 0:
            self.raw = self.raw[indices, ...]
        super().batch_select_indices(indices)

    def keep(self, idx: torch.Tensor, turn) -> None:
        """Keep slots ``idx`` [B, K] and rotate their raw keys by ``turn`` (cos, sin of the deltas)."""
        if not self.is_initialized or self.keys.numel() == 0:
            return
        dev = self.keys.device
        gather = idx.to(dev)[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.raw = self.raw.gather(2, gather)
        self.values = self.values.gather(2, gather)
        self.keys = rotate(self.raw, *(t.to(dev) for t in turn))


def turn_of(delta: torch.Tensor, inv_freq: torch.Tensor):
    """(cos, sin) [B, 1, K, D] of a RoPE rotation by ``delta`` [B, K] positions (fp32, without the rope's
    attention scaling: that is in the key once already)."""
    angle = delta.float()[..., None] * inv_freq.float().to(delta.device)  # [B, K, D/2]
    emb = torch.cat([angle, angle], -1)[:, None]
    return emb.cos(), emb.sin()


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on keys [B, H, K, D] (half-split layout, as Llama's ``apply_rotary_pos_emb``):
    R(a) R(b) = R(a + b), so a key rotated at p becomes the key at p + delta."""
    k = keys.float()
    half = k.shape[-1] // 2
    rot = torch.cat([-k[..., half:], k[..., :half]], -1)
    return (k * cos + rot * sin).to(keys.dtype)


def policy(valid: torch.Tensor, sink: torch.Tensor, first: int, window: int) -> torch.Tensor:
    """[B, T] bool: the slots to keep. Per sample, over its real slots in order (rank r of n): r < first,
    or r >= n - window, or flagged as a sink."""
    rank = valid.long().cumsum(1) - 1
    n = valid.sum(1, keepdim=True)
    return valid & ((rank < first) | (rank >= n - window) | sink)


class WindowCache(Cache):
    """A cache of ``WindowLayer`` s with the per-sample slot bookkeeping the window needs.

    ``valid`` / ``origin`` / ``orig_pos`` / ``sink`` [B, T]: a slot holds a real token; which column of the
    stream (the ``generate`` attention mask's column) it came from; the rotary position its raw key was
    written at; the detector flagged it. ``seen``: columns seen, what transformers is told as the length.
    """

    layer_class = WindowLayer

    def __init__(self, cfg, inv_freq: torch.Tensor):
        super().__init__(layer_class_to_replicate=self.layer_class)
        self.cfg, self.inv_freq = cfg, inv_freq
        self.valid = self.origin = self.orig_pos = self.sink = None
        self.seen = 0
        self.compacted = False  # an eviction happened: positions and mask are the cache's own
        self.masks: dict = {}  # this step's layer masks by (base, dtype)
        self.step_q = 0

    # ---- per forward, before the layers (see mmsink.kv.hooks)
    def begin(self, new_valid: torch.Tensor, positions: torch.Tensor) -> None:
        q = self.step_q = new_valid.shape[1]
        cols = torch.arange(self.seen, self.seen + q, device=new_valid.device).expand_as(new_valid)
        new = (new_valid, torch.where(new_valid, cols, -1), positions, torch.zeros_like(new_valid))
        if self.valid is None:
            self.valid, self.origin, self.orig_pos, self.sink = new
        else:
            old = (self.valid, self.origin, self.orig_pos, self.sink)
            self.valid, self.origin, self.orig_pos, self.sink = (
                torch.cat([o, x.to(o.device)], 1) for o, x in zip(old, new, strict=True)
            )
        self.masks = {}

    def next_positions(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Positions of a step's new tokens once the cache owns them: after the kept ones."""
        n = self.valid.sum(1, keepdim=True).to(new_valid.device)
        return (n + new_valid.long().cumsum(1) - 1).clamp(min=0)

    def flag(self, is_sink: torch.Tensor) -> None:
        """The detector's verdict on this step's new tokens (real tokens only)."""
        q = is_sink.shape[1]
        self.sink[:, -q:] |= is_sink.to(self.sink.device) & self.valid[:, -q:]

    def mask(self, build, base: str, dtype):
        key = (base, dtype)
        if key not in self.masks:
            self.masks[key] = build(base, self.valid, self.step_q, dtype)
        return self.masks[key]

    # ---- after the forward
    def end(self, q: int) -> None:
        self.seen += q
        self.evict()

    def evict(self) -> None:
        keep = policy(self.valid, self.sink, self.cfg.first, self.cfg.window)
        if bool((keep == self.valid).all()):
            return
        t = keep.shape[1]
        score = torch.where(keep, torch.arange(t, device=keep.device), -1)
        k = int(keep.sum(1).max())
        sel = score.sort(1).values[:, t - k :]  # kept slots in order, left-padded with -1
        valid = sel >= 0
        idx = sel.clamp(min=0)
        new_pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        orig = self.orig_pos.gather(1, idx)
        delta = torch.where(valid, new_pos - orig, 0)
        turn = turn_of(delta, self.inv_freq)
        for layer in self.layers:
            layer.keep(idx, turn)
        self.valid, self.origin = valid, torch.where(valid, self.origin.gather(1, idx), -1)
        self.orig_pos, self.sink = orig, self.sink.gather(1, idx) & valid
        self.compacted = True

    def kept_origins(self) -> list[list[int]]:
        """Per sample, the stream columns its cache holds (for tests and stats)."""
        return [o[v].tolist() for o, v in zip(self.origin, self.valid, strict=True)]

    # ---- what transformers asks
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self.seen + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.valid is not None:
            i = beam_idx.to(self.valid.device)
            self.valid, self.origin, self.orig_pos, self.sink = (
                x.index_select(0, i) for x in (self.valid, self.origin, self.orig_pos, self.sink)
            )

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.valid is not None:
            self.valid, self.origin, self.orig_pos, self.sink = (
                x.repeat_interleave(repeats, 0) for x in (self.valid, self.origin, self.orig_pos, self.sink)
            )

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.valid is not None:
            self.valid, self.origin, self.orig_pos, self.sink = (
                x[indices] for x in (self.valid, self.origin, self.orig_pos, self.sink)
            )

    def crop(self, max_length: int):
        raise NotImplementedError("mmsink: cropping a sink + window cache is not supported (assisted)")
