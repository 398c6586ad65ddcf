"""LFPS sparse decoding ("Learn from the Past: Fast Sparse Indexing for LLM Decoding", Yao & Wang 2025):
``wrap(model, kv={"sparse": "lfps", "topk": 512})``.

At a decode step each query head attends to ``topk`` keys only, chosen among candidates predicted from
the previous step's choice of the same layer and head: the vertical pattern (the same key slots again),
the slash pattern (those slots shifted by one, i.e. the same distance from the new query) and
positional expansion (every candidate widened by +-``expand`` neighbours), plus the newest key. The
candidates are scored exactly (q . k, nothing else is read) and the top ``topk`` of them are attended
to (softmax over them). The first ``dense_steps`` decode steps after every multi-token forward attend
densely and seed the history with the exact top-k. A sample whose cache holds at most ``topk`` real
keys attends to all of them (the exact top-k is then everything).

``sinks`` N (mmsink's addition, not the paper's; default 0 = the paper's rule): each sample's first N real
key slots (after its left padding) are candidates and chosen at every step, counted inside ``topk``;
the other ``topk - N`` follow the rule. Without it a sink a query once gives ~0 weight leaves the history
and no later step can reach it (issue 17: top-64 on models/synthllava-sinks).

Defaults are ours (topk 512, dense_steps 2, expand 1): the paper's full text and code were not
available to check its values. A sparse step reads only its candidates' keys (a gather of ~(2 expand + 2)
topk rows) and the chosen values (topk rows), whether or not some sample is short (a short sample's
candidates are its real slots, at most topk: fixed shapes, no host sync); only a dense step (and the
exact oracle) scores every key. ``evals/lfps_cost.py`` counts the ops and bytes of one call.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..core.cache import PlanCache
from .window import WindowCache


def sink_slots(valid: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] each sample's first ``n`` real key slots (T where it holds fewer): fixed shape, no host sync."""
    want = torch.arange(1, n + 1, device=valid.device).expand(valid.shape[0], n).contiguous()
    return torch.searchsorted(valid.cumsum(1), want)


def sink_mask(valid: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T] each sample's first ``n`` real key slots."""
    return valid & (valid.long().cumsum(1) <= n)


def candidates(hist: torch.Tensor, t, expand: int, width: int | None = None, sinks=None) -> torch.Tensor:
    """[B, H, C] candidate key slots (-1: none), each once, in ascending order: ``hist`` [B, H, k] (the
    previous step's slots, -1 for none) shifted by -expand .. expand + 1 (vertical and slash, widened), plus
    the newest slot ``t - 1`` and ``sinks`` [B, n] (``sink_slots``; None: none). ``t``: the keys held, an
    int or a 0-dim tensor (``generate_fast``'s static buffer of ``width`` slots: no host sync)."""
    width = t if width is None else width
    b, h, _ = hist.shape
    # an empty entry (-1) becomes width + expand + 1, so that every shift of it lands past width; a shift
    # below 0 wraps past width too: everything out of range sorts after the real slots, in one sort
    m = width + expand + 2
    offs = torch.arange(-expand, expand + 2, device=hist.device)
    shifted = (hist.remainder(m)[..., None] + offs).flatten(2).remainder(m + expand + 1)
    if isinstance(t, torch.Tensor):
        newest = (t - 1).view(1, 1, 1).expand(b, h, 1)
    else:
        newest = hist.new_full((b, h, 1), t - 1)
    parts = [shifted, newest]
    if sinks is not None:
        parts.append(sinks[:, None, :].expand(b, h, -1))
    c = torch.cat(parts, 2).sort(2).values
    drop = c >= t
    drop[..., 1:].logical_or_(c[..., 1:] == c[..., :-1])  # repeats of a slot (in place: no copy back)
    return c.masked_fill(drop, -1)


def ranked_topk(scores, ok, forced, k: int):
    """(scores, indices) of the top ``k`` of ``scores`` where ``ok``, ``forced`` ones first (None: none);
    -inf where fewer than ``k`` are ``ok``."""
    ranked = scores.where(ok, float("-inf"))
    if forced is None:
        top = ranked.topk(k, -1)
        return top.values, top.indices
    top = ranked.masked_fill(forced & ok, float("inf")).topk(k, -1)
    return scores.gather(-1, top.indices).masked_fill(top.values == float("-inf"), float("-inf")), top.indices


def select(
    q,
    key,
    valid,
    hist,
    topk: int,
    expand: int,
    dense: bool,
    scaling: float,
    all_long=None,
    length=None,
    sinks: int = 0,
):
    """One decode step's choice: (scores [B, H, k'] of the chosen keys, -inf where none; slots [B, H, k'],
    each a slot of ``key``, whatever it holds where the score is -inf). q [B, H, D]; key [B, Hk, T, D];
    valid [B, T] real key slots; hist [B, H, k] or None. A dense step (or no history) scores every key; a
    sparse one reads only its candidates' keys (each short sample's candidates: its real slots).
    ``all_long``: True when the caller knows that every sample holds more than ``topk`` real keys (the
    short-sample candidates are then not built); else each sample's case is chosen on the device.
    ``length``: the keys held when ``key`` is a wider static buffer (a 0-dim tensor; default T).
    ``sinks``: each sample's first ``sinks`` real slots are candidates and chosen first."""
    b, h, d = q.shape
    hk, t = key.shape[1], key.shape[2]
    length = t if length is None else length
    qg = q.view(b, hk, h // hk, d).float()
    forced = sink_mask(valid, sinks) if sinks else None  # [B, T]
    if dense or hist is None:
        scores = torch.einsum("bkgd,bktd->bkgt", qg, key.float()).reshape(b, h, t) * scaling
        allowed = valid[:, None, :].expand(b, h, t)
        return ranked_topk(scores, allowed, None if forced is None else forced[:, None, :], min(topk, t))
    k = min(topk, t)
    extra = (sink_slots(valid, sinks),) if sinks else ()  # as an argument only then: patched candidates
    c = candidates(hist, length, expand, t, *extra)  # [B, H, C]
    n = max(c.shape[2], k)
    c = torch.nn.functional.pad(c, (0, n - c.shape[2]), value=-1) if n > c.shape[2] else c
    if not all_long:  # fixed shapes, no host sync: a short sample's candidates are its real slots (<= k)
        held = valid.cumsum(1)
        want = torch.arange(1, n + 1, device=valid.device).expand(b, n).contiguous()
        short = torch.searchsorted(held, want)  # its first n real slots, t past its last
        short = short.masked_fill(short == t, -1)
        c = torch.where((held[:, -1] > topk)[:, None, None], c, short[:, None, :])
    at = c.clamp(min=0)
    keys = key.gather(2, at.view(b, hk, -1)[..., None].expand(-1, -1, -1, d)).view(b, hk, h // hk, n, d)
    scores = torch.einsum("bkgd,bkgnd->bkgn", qg, keys.float()).reshape(b, h, n) * scaling
    flat = at.view(b, -1)
    ok = (c >= 0) & valid.gather(1, flat).view(b, h, n)
    sink = None if forced is None else forced.gather(1, flat).view(b, h, n)
    values, idx = ranked_topk(scores, ok, sink, k)
    return values, at.gather(2, idx)


def attend(scores, slots, value) -> torch.Tensor:
    """Softmax over the chosen keys' scores and their values: [B, H, D]."""
    b, h, k = slots.shape
    hk, d = value.shape[1], value.shape[-1]
    w = torch.softmax(scores, -1)
    v = value.gather(2, slots.reshape(b, hk, -1)[..., None].expand(-1, -1, -1, d)).view(b, h, k, d)
    return torch.einsum("bhk,bhkd->bhd", w, v.float())


def step(q, key, value, valid, hist, cfg, dense_step: bool, scaling, all_long, exact=False, length=None):
    """One decode step of one layer: (attention output [B, H, D] fp32, the next history [B, H, k]). A dense
    step (the first ``cfg.dense_steps`` after a prompt) attends to every real key and its history is the
    exact top-k; ``exact`` (the oracle) scores every key and attends to the top-k. ``cfg.sinks`` slots are
    always chosen (the history then holds them and the top ``topk - sinks`` others). ``generate``'s cache
    and ``generate_fast``'s step (``mmsink.kv.fast_sparse``) both run this."""
    k = key.shape[2] if dense_step else cfg.topk
    dense = dense_step or exact
    sinks = getattr(cfg, "sinks", 0)
    scores, slots = select(q, key, valid, hist, k, cfg.expand, dense, scaling, all_long, length, sinks)
    top = slice(0, cfg.topk)  # sorted (sinks first): a dense step's history is the exact top-k
    nxt = torch.where(scores[..., top] > float("-inf"), slots[..., top], -1)  # (isfinite is 4 ops)
    return attend(scores, slots, value), nxt


class GrowLayer(DynamicLayer):
    """A dynamic layer whose keys / values are views of buffers with spare slots: a decode step writes its
    slot in place instead of copying the whole cache (``DynamicLayer``'s ``torch.cat``, O(context) per
    step). A full buffer grows by an eighth (at least 256 slots). Batch edits (beams) and crops replace
    ``keys`` / ``values`` (as does a caller that sets them): the next write copies them into a new buffer."""

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.kbuf = self.vbuf = self.view = self.vview = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = self.keys.shape[-2] if self.keys.dim() == 4 else 0, key_states.shape[-2]
        moved = self.keys is not self.view or self.values is not self.vview  # set from outside
        if self.kbuf is None or moved or n + q > self.kbuf.shape[-2]:
            cap = n + q + max(256, (n + q) // 8)
            kbuf = key_states.new_empty(*key_states.shape[:2], cap, key_states.shape[-1])
            vbuf = value_states.new_empty(*value_states.shape[:2], cap, value_states.shape[-1])
            if n:
                kbuf[:, :, :n] = self.keys
                vbuf[:, :, :n] = self.values
            self.kbuf, self.vbuf = kbuf, vbuf
        self.kbuf[:, :, n : n + q] = key_states
        self.vbuf[:, :, n : n + q] = value_states
        self.keys, self.values = self.kbuf[:, :, : n + q], self.vbuf[:, :, : n + q]
        self.view, self.vview = self.keys, self.values
        return self.keys, self.values


class SparseCache(WindowCache):
    """A cache without eviction (``GrowLayer`` s) with the window's per-sample validity and, per layer, the
    previous step's chosen slots [B, H, k]. ``trace``: a list to append (layer, q, keys, slots) to."""

    layer_class = GrowLayer
    exact = False  # ExactTopkCache: every step scores all keys

    def __init__(self, cfg, inv_freq):
        super().__init__(cfg, inv_freq)
        self.init_sparse()

    def init_sparse(self) -> None:
        self.hist: dict = {}
        self.steps = 0  # decode steps since the last multi-token forward
        self.trace: list | None = None
        self.long: dict = {}  # this step: id(key validity) -> every sample holds more than topk keys

    def begin(self, new_valid, positions) -> None:
        super().begin(new_valid, positions)
        self.long = {}

    def all_long(self, valid: torch.Tensor) -> bool:
        """One host sync per step and key set (layers share them), not one per layer."""
        if id(valid) not in self.long:
            self.long[id(valid)] = (valid, bool((valid.sum(1) > self.cfg.topk).all()))
        return self.long[id(valid)][1]

    def key_valid(self, layer: int) -> torch.Tensor:
        """[B, T] the real key slots of ``layer``."""
        return self.valid

    def attend(self, layer: int, query, key, value, mask, scaling, base):
        cfg = self.cfg
        valid = self.key_valid(layer)
        dense_step = self.steps < cfg.dense_steps
        long = None if dense_step or self.exact or layer not in self.hist else self.all_long(valid)
        q = query[:, :, 0]
        hist = self.hist.get(layer)
        out, self.hist[layer] = step(
            q, key, value, valid.to(query.device), hist, cfg, dense_step, scaling, long, self.exact
        )
        if self.trace is not None:
            self.trace.append((layer, q.detach(), key.detach(), self.hist[layer]))
        return out[:, None].to(query.dtype)  # [B, 1, H, D]

    def evict(self) -> None:
        if self.step_q == 1:
            self.steps += 1
        else:  # a prompt or a new turn: dense again for the first steps
            self.steps, self.hist = 0, {}

    def end(self, q: int) -> None:
        self.seen += q
        self.evict()

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self.hist = {k: h.index_select(0, beam_idx.to(h.device)) for k, h in self.hist.items()}

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.hist = {k: h.repeat_interleave(repeats, 0) for k, h in self.hist.items()}

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.hist = {k: h[indices] for k, h in self.hist.items()}


class ExactTopkCache(SparseCache):
    """The oracle LFPS approximates: every decode step attends to the exact top ``topk`` keys of the
    current query (all keys scored; no history). For evaluations: pass it as ``past_key_values`` to a
    model wrapped with ``kv={"sparse": "lfps", ...}``."""

    exact = True


class PlanSparseCache(SparseCache, PlanCache):
    """LFPS after a pruned prefill: each layer chooses among its own segment's slots."""

    def __init__(self, cfg, inv_freq):
        PlanCache.__init__(self)
        self.layer_class_to_replicate = GrowLayer
        self.init_window(cfg, inv_freq)
        self.init_sparse()
        self.prefill = None  # set by the hooks; unused here

    def key_valid(self, layer: int) -> torch.Tensor:
        if not self.planned:
            return self.valid
        return self.segment_valid[self.layer_segment[layer]]
