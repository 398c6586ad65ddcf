"""The public functions: wrap, unwrap, disabled, stats, methods (generate_fast lives in ``mmsink.fast``)."""

from __future__ import annotations

import contextlib

from .core import varlen as varlen_kernels
from .core.attention import registered_name
from .core.config import apply_config
from .core.hooks import ATTR, Handle, get_handle
from .core.stats import Stats
from .kv import make_config as make_kv_config
from .pruners import REGISTRY
from .quant import fake
from .sinks import regcache as regcache_module
from .sinks import var as var_module
from .sinks import vitsink

__all__ = ["wrap", "unwrap", "disabled", "stats", "methods", "get_handle"]


def make_pruner(prune, budget, options):
    if prune is None:
        if budget is not None or options:
            raise ValueError("mmsink: budget and method options need a method (prune=...)")
        return None
    if not isinstance(prune, str) or prune not in REGISTRY:
        raise ValueError(f"mmsink: unknown method {prune!r}; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[prune](budget=budget, **options)


def orthorank_alias(settings, prune, budget, options):
    """``orthorank={...}`` (or True): OrthoRank's own per-layer form, i.e. ``prune="orthorank",
    form="layers"`` with the dict's ``budget``, ``layer``, ``layers``, ``sink``."""
    if prune is not None or budget is not None or options:
        raise ValueError(
            "mmsink: orthorank={...} is a method of its own: it does not combine with prune=, budget= or "
            "method options (put budget, layer, layers, sink in the dict)"
        )
    if settings is True:
        settings = {}
    if not isinstance(settings, dict) or "form" in settings:
        raise ValueError(f"mmsink: orthorank must be a dict of budget, layer, layers, sink; got {settings!r}")
    settings = dict(settings)
    return "orthorank", settings.pop("budget", None), {**settings, "form": "layers"}


def wrap(
    model,
    prune=None,
    budget=None,
    var=False,
    sink_forward=False,
    config=None,
    varlen=None,
    kv=None,
    regcache=None,
    quant_vision=None,
    orthorank=None,
    **options,
):
    """Attach mmsink to ``model`` (in place; returns it). Re-wrapping replaces the settings.
    ``config``: a file written by ``mmsink calibrate``; it supplies VAR's sink dimensions, the ViT-sink
    threshold and VisiPruner's fallback layer where the call does not give them.
    ``varlen``: padded prefill segments through a variable-length FlashAttention kernel (default: where
    available, i.e. CUDA, fp16 / bf16, SDPA models; ``True`` requires a kernel, ``False`` turns it off).
    ``regcache``: a ``mmsink.sinks.regcache.RegCache`` (from ``regcache.curate``): cached registers prefixed
    to the vision tower's middle-to-late blocks; ``quant_vision``: "w8a8", "w6a6", "w4a8", "w4a4" or a
    dict (``bits``, ``act``: "per_tensor" / "per_token"): the tower's linears fake-quantized.
    ``orthorank``: OrthoRank's own per-layer form, a dict of its options (``mmsink.pruners.orthorank``)."""
    from .patches import family_for

    if orthorank is not None:
        prune, budget, options = orthorank_alias(orthorank, prune, budget, options)

    if varlen not in (None, True, False):
        raise ValueError(f"mmsink: varlen must be None, True or False, got {varlen!r}")
    if varlen is True and varlen_kernels.kernel() is None:
        raise ValueError("mmsink: varlen=True needs torch.nn.attention.varlen or the flash_attn package")
    if config is not None:
        var, sink_forward, options = apply_config(config, prune, budget, var, sink_forward, options)
    var_cfg = var_module.make_config(var)
    sink_cfg = vitsink.make_config(sink_forward)
    pruner = make_pruner(prune, budget, options)
    if pruner is not None:
        pruner.check_with(var_cfg)
    kv_cfg = make_kv_config(kv)
    quant_cfg = fake.make_config(quant_vision)
    if regcache is not None and not isinstance(regcache, regcache_module.RegCache):
        raise ValueError("mmsink: regcache must be a RegCache from mmsink.sinks.regcache.curate, or None")
    if regcache is not None and regcache.delete and getattr(pruner, "uses_vision", False):
        raise ValueError(f"mmsink: regcache delete= does not combine with a vision-stage pruner ({prune})")
    family = family_for(model)
    tower = regcache_module.parts_of(family) if regcache is not None or quant_cfg is not None else None
    old = getattr(model, "__dict__", {}).get(ATTR)
    if old is not None:
        old.detach()
    handle = None
    try:
        handle = Handle(model, family, pruner, var_cfg, sink_cfg, varlen, kv_cfg)
        handle.attach()
        if tower is not None:
            on = lambda: handle.enabled  # noqa: E731 - disabled() runs the plain tower too
            handle.hooks += regcache_module.install(model, tower, regcache, quant_cfg, on)
    except Exception:
        if handle is not None and handle.hooks:
            handle.detach()
        if old is not None:  # refused settings leave the previous wrap in place
            old.attach()
        raise
    return model


def unwrap(model):
    """Remove mmsink from ``model``: hooks, attention entry and bound methods, and the decoders that
    ``generate_fast`` kept on it; returns the model."""
    from .fast import clear

    get_handle(model).detach()
    clear(model)
    return model


@contextlib.contextmanager
def disabled(model):
    """Run the untouched model (same weights) inside the block."""
    h = get_handle(model)
    prev, h.enabled = h.enabled, False
    h.set_attention(h.base)
    try:
        yield model
    finally:
        h.enabled = prev
        if getattr(model, "__dict__", {}).get(ATTR) is h:  # still wrapped (not unwrapped inside the block)
            h.set_attention(registered_name(h.base))


def stats(model) -> Stats | None:
    """What the last prefill did (built on first request after it)."""
    h = get_handle(model)
    if callable(h.last_stats):
        h.last_stats = h.last_stats()
    return h.last_stats


def methods() -> list[str]:
    return sorted(REGISTRY)
