"""The sink + window KV cache (StreamingLLM, Xiao et al., ICLR 2024).

After every forward each sample keeps its first ``first`` real tokens (the paper's sinks), the tokens the
massive-activation detector flagged (``"auto"``), and its last ``window`` real tokens; the middle is
evicted. Positions live inside the cache: a kept token's rotary position becomes its rank among the
sample's kept tokens (0, 1, ...), and the next token's position is the number of kept tokens, so
positions stay below first + sinks + window + 1 however long generation runs.

3-D M-RoPE (Qwen2-VL / 2.5-VL; ``compact``): kept tokens form runs of consecutive stream columns; a run
moves by one shift applied to all three axes (t, h, w), so an image's 2-D layout inside a run is
unchanged, and each run starts one past the largest position (any axis) of the runs before it (the
first at 0). The next token sits one past the largest kept position. For 1-D positions this is the
rank rule above. Because the shift is the same on every axis, the key's rotation by it is the 1-D one
with the same frequencies.

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


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None):
    """RoPE on keys [B, H, K, D] (half-split layout, as Llama's ``apply_rotary_pos_emb``):
    R(a) R(b) = R(a + b), so a key rotated at p becomes the key at p + delta. ``out``: where to write the
    result (keys' shape and dtype, may be a view; must not overlap ``keys``), else a new tensor.

    Half by half, in fp32: ``x1 cos - x2 sin`` and ``x2 cos + x1 sin``, bitwise the rotate-half form
    ``k cos + (-x2, x1) sin`` (negating a product is exact, and so is a - b == a + (-b)) without its
    negated copy, concatenation and full-width temporaries: fewer bytes moved per eviction."""
    k = keys.float()
    half = k.shape[-1] // 2
    x1, x2 = k[..., :half], k[..., half:]
    out = torch.empty_like(keys) if out is None else out
    lo = x1 * cos[..., :half]
    lo -= x2 * sin[..., :half]
    out[..., :half] = lo
    hi = x2 * cos[..., half:]
    hi += x1 * sin[..., half:]
    out[..., half:] = hi
    return out


def compact(pos: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """New positions [B, K, A] of kept slots (``pos`` [B, K, A] the positions they hold, ``cols`` their stream
    columns, left-padded by ``valid``): runs of consecutive columns shift as one, each starting one past
    the largest position of the runs before it."""
    b, k, _ = pos.shape
    ar = torch.arange(k, device=pos.device).expand(b, k)
    prev_col = torch.cat([cols.new_full((b, 1), -2), cols[:, :-1]], 1)
    prev_valid = torch.cat([valid.new_zeros(b, 1), valid[:, :-1]], 1)
    start = valid & (~prev_valid | (cols != prev_col + 1))
    run = start.long().cumsum(1)  # 1.. per run, 0 on padding
    first = torch.where(start, ar, -1).cummax(1).values.clamp(min=0)
    lo = pos.amin(-1).gather(1, first)  # the run's first token's smallest coordinate
    ext = torch.where(valid, pos.amax(-1) - lo, 0)
    width = ext.new_zeros(b, k + 1).scatter_reduce(1, run, ext, "amax")  # per run id
    width[:, 0].fill_(-1)  # a fill, not a host scalar copied in (CUDA graphs: generate_fast)
    begin = (width + 1).cumsum(1) - (width + 1)  # exclusive: one past the runs before
    new = pos - lo[..., None] + begin.gather(1, run)[..., None]
    return torch.where(valid[..., None], new, 0)


def policy(valid: torch.Tensor, sink: torch.Tensor, first: int, window: int) -> torch.Tensor:
    """[B, T] bool: the slots to keep. Per sample, over its real slots in order (rank r of n): r < first,
    or r >= n - window, or flagged as a sink."""
    rank = valid.long().cumsum(1) - 1
    n = valid.sum(1, keepdim=True)
    return valid & ((rank < first) | (rank >= n - window) | sink)


class WindowCache(Cache):
    """A cache of ``WindowLayer`` s with the per-sample slot bookkeeping the window needs.

    ``valid`` / ``origin`` / ``sink`` [B, T]: a slot holds a real token; which column of the stream (the
    ``generate`` attention mask's column) it came from; the detector flagged it. ``orig_pos`` / ``pos``
    [B, T, A]: the rotary position its raw key was written at, the one it holds now. ``seen``: columns
    seen, what transformers is told as the length.
    """

    layer_class = WindowLayer
    fields = ("valid", "origin", "orig_pos", "pos", "sink")

    def __init__(self, cfg, inv_freq: torch.Tensor):
        super().__init__(layer_class_to_replicate=self.layer_class)
        self.init_window(cfg, inv_freq)

    def init_window(self, cfg, inv_freq: torch.Tensor) -> None:
        self.cfg, self.inv_freq = cfg, inv_freq
        self.valid = self.origin = self.orig_pos = self.pos = self.sink = None
        self.seen = 0
        self.axes = 1  # position coordinates per token: 3 for M-RoPE (set by the hooks)
        self.next_pos = None  # [B, 1] the next token's position once compacted
        self.compacted = False  # an eviction happened: positions and mask are the cache's own
        self.masks: dict = {}  # this step's layer masks by (base, dtype)
        self.step_q = 0

    def map_fields(self, fn) -> None:
        """Apply ``fn`` to every per-sample bookkeeping tensor (beam search, batch edits)."""
        if self.valid is not None:
            for name in self.fields:
                setattr(self, name, fn(getattr(self, name)))

    # ---- per forward, before the layers (see mmsink.kv.hooks)
    def begin(self, new_valid: torch.Tensor, positions: torch.Tensor) -> None:
        """Record a forward's new tokens: validity [B, q], positions [B, q] or [B, q, A] (M-RoPE)."""
        q = self.step_q = new_valid.shape[1]
        cols = torch.arange(self.seen, self.seen + q, device=new_valid.device).expand_as(new_valid)
        if positions.dim() == 2:
            positions = positions[..., None].expand(-1, -1, self.axes)
        new = dict(
            valid=new_valid,
            origin=torch.where(new_valid, cols, -1),
            orig_pos=positions,
            pos=positions,
            sink=torch.zeros_like(new_valid),
        )
        if self.valid is None:
            for name in self.fields:
                setattr(self, name, new[name])
        else:
            self.map_fields_with(new, lambda o, x: torch.cat([o, x.to(o.device)], 1))
        self.masks = {}

    def map_fields_with(self, new: dict, fn) -> None:
        for name in self.fields:
            setattr(self, name, fn(getattr(self, name), new[name]))

    def next_positions(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Positions of a step's new tokens once the cache owns them: after the kept ones."""
        n = self.next_pos.to(new_valid.device)
        return (n + new_valid.long().cumsum(1) - 1).clamp(min=0)

    def set_positions(self, positions: torch.Tensor) -> None:
        """The positions [B, q, A] the model really used for this step's tokens (M-RoPE's 3-D ones)."""
        q = positions.shape[1]
        new = positions.to(self.orig_pos.device)
        self.orig_pos = torch.cat([self.orig_pos[:, :-q], new], 1)
        self.pos = torch.cat([self.pos[:, :-q], new], 1)

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
        if self.compacted:  # the step's tokens took the next positions (an eviction recomputes them)
            self.next_pos = self.next_pos + self.valid[:, -q:].sum(1, keepdim=True).to(self.next_pos.device)
        self.evict()

    def kept_slots(self):
        """(idx [B, K] kept slots in order, left-padded; valid [B, K]), or None when nothing goes."""
        keep = policy(self.valid, self.sink, self.cfg.first, self.cfg.window)
        if bool((keep == self.valid).all()):
            return None
        t = keep.shape[1]
        score = torch.where(keep, torch.arange(t, device=keep.device), -1)
        k = int(keep.sum(1).max())
        sel = score.sort(1).values[:, t - k :]  # kept slots in order, left-padded with -1
        return sel.clamp(min=0), sel >= 0

    def evict(self) -> None:
        kept = self.kept_slots()
        if kept is None:
            return
        idx, valid = kept
        origin, orig, pos = self.compacted_stream(idx, valid)
        turn = turn_of(torch.where(valid, pos[..., 0] - orig[..., 0], 0), self.inv_freq)
        for layer in self.layers:
            layer.keep(idx, turn)
        self.settle(idx, valid, origin, orig, pos)

    def compacted_stream(self, idx, valid):
        """(origin, raw positions, new positions) of the kept slots ``idx`` / ``valid``."""
        origin = torch.where(valid, self.origin.gather(1, idx), -1)
        rows = idx[..., None].expand(-1, -1, self.pos.shape[-1])
        return origin, self.orig_pos.gather(1, rows), compact(self.pos.gather(1, rows), origin, valid)

    def settle(self, idx, valid, origin, orig, pos) -> None:
        self.valid, self.origin, self.orig_pos, self.pos = valid, origin, orig, pos
        self.sink = self.sink.gather(1, idx) & valid
        self.next_pos = torch.where(valid[..., None], pos, -1).amax((1, 2))[:, None] + 1
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
        self.map_fields(lambda x: x.index_select(0, beam_idx.to(x.device)))
        if self.next_pos is not None:
            self.next_pos = self.next_pos.index_select(0, beam_idx.to(self.next_pos.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.map_fields(lambda x: x.repeat_interleave(repeats, 0))
        if self.next_pos is not None:
            self.next_pos = self.next_pos.repeat_interleave(repeats, 0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.map_fields(lambda x: x[indices])
        if self.next_pos is not None:
            self.next_pos = self.next_pos[indices]

    def crop(self, max_length: int):
        raise NotImplementedError("mmsink: cropping a sink + window cache is not supported (assisted)")
