"""The hooks that run the sink + window cache (and the quantized one, a subclass) inside ``generate``.

Installed by the handle after its own (so they run after its model-level pre-hook) and removed with it.
Model pre-hook: a fresh forward with an empty cache gets a ``WindowCache``; every forward records its new
tokens' validity and positions, and once the cache has evicted, positions become cache slots. Layer
pre-hook: the detector scores the ``sink_layer`` input ("auto"); after an eviction the layer's mask is
the cache's own (transformers' mask describes the full stream). Model post-hook: evict.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import DynamicCache

from ..core.attention import Directive, build_mask
from ..core.cache import PlanCache
from ..core.plan import Prefill
from ..sinks.var import sink_scores
from .sparse import SparseCache
from .window import WindowCache


def install(cfg, handle) -> list:
    fam = handle.family
    model = handle.model
    hooks = [
        model.register_forward_pre_hook(_model_pre(cfg, handle), with_kwargs=True),
        model.register_forward_hook(_model_post(handle), with_kwargs=True),
    ]
    for i, layer in enumerate(fam.layers):
        hooks.append(layer.register_forward_pre_hook(_layer_pre(cfg, handle, i), with_kwargs=True))
    if fam.mrope:
        hooks.append(fam.language_model.register_forward_pre_hook(_record_mrope, with_kwargs=True))
    return hooks


def _record_mrope(module, args, kwargs):
    """The 3-D (t, h, w) positions the text model got for this step's tokens: the keys are written there."""
    cache = kwargs.get("past_key_values")
    pos = kwargs.get("position_ids")
    if isinstance(cache, WindowCache) and cache.step_q and pos is not None and pos.dim() == 3:
        cache.set_positions(pos[-3:].permute(1, 2, 0))
    return None


def _model_pre(cfg, handle):
    rope = handle.family.language_model.rotary_emb

    def hook(module, args, kwargs):
        if not handle.enabled:
            return None
        pkv = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(handle.family.text_config, "use_cache", True)
        ctx = handle.ctx
        if isinstance(pkv, WindowCache):
            cache = pkv
        elif use_cache and (pkv is None or (type(pkv) is DynamicCache and pkv.get_seq_length() == 0)):
            cache = kwargs["past_key_values"] = cfg.new_cache(rope.inv_freq)
        elif type(pkv) is PlanCache and isinstance(ctx, Prefill) and ctx.cache is pkv and not pkv.planned:
            # the handle's pruned prefill just made this cache: the window version takes its place
            cache = ctx.cache = kwargs["past_key_values"] = cfg.new_cache(rope.inv_freq, planned=True)
            cache.prefill = ctx
        else:
            return None  # a cache of another kind (or none): untouched
        if cache.valid is None:
            cache.axes = 3 if handle.family.mrope else 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        b, q = ref.shape[:2]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            new_valid = mask[:, -q:].bool()
        else:
            new_valid = torch.ones(b, q, dtype=torch.bool, device=ref.device)
        if cache.compacted:
            pos = kwargs["position_ids"] = cache.next_positions(new_valid).to(ref.device)
        else:
            pos = kwargs.get("position_ids")
            if pos is None or pos.dim() != 2:  # what a 1-D text model would do (M-RoPE: set_positions)
                pos = torch.arange(cache.seen, cache.seen + q, device=ref.device)
            pos = pos.expand(b, q)
        cache.begin(new_valid, pos.to(new_valid.device))
        return args, kwargs

    return hook


def _model_post(handle):
    def hook(module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        if isinstance(cache, WindowCache) and cache.step_q:
            cache.end(cache.step_q)
            cache.step_q = 0
        return None

    return hook


def _layer_pre(cfg, handle, layer: int):
    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, WindowCache) or not cache.step_q:
            return None
        if isinstance(cache, SparseCache) and cache.step_q == 1:  # LFPS: this layer's decode attention
            kwargs["mmsink"] = Directive(layer, reweight=functools.partial(cache.attend, layer))
            return args, kwargs
        hidden = args[0] if args else kwargs["hidden_states"]
        if cfg.auto and layer == cfg.sink_layer:
            flags = sink_scores(hidden, cfg.sink_dims) > cfg.tau
            if isinstance(handle.ctx, Prefill) and not handle.ctx.seg.full:  # a pruned segment's slots
                flags = _to_columns(flags, handle.ctx.seg, cache.step_q)
            cache.flag(flags)
        if not cache.compacted or isinstance(cache, PlanCache):  # the handle builds per-segment masks
            return None
        mask = cache.mask(build_mask, handle.base, hidden.dtype)
        kwargs["attention_mask"] = mask.to(hidden.device)
        return args, kwargs

    return hook


def _to_columns(flags: torch.Tensor, seg, q: int) -> torch.Tensor:
    """[B, n] flags of a segment's slots -> [B, q] flags of the forward's columns."""
    out = flags.new_zeros(flags.shape[0], q + 1)
    idx = torch.where(seg.valid.to(flags.device), seg.idx.to(flags.device), q)
    return out.scatter(1, idx, flags)[:, :q]
