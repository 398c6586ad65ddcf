"""Model-family adapters, one module per family behind the protocol of ``mmsink.core.family``: where a
family keeps its decoder layers, projector and image tokens. Dispatch on ``config.model_type``; each
adapter is small and holds no copied modeling code."""

from __future__ import annotations

from . import llava, llava_next, qwen2_vl

FAMILIES = {t: mod.Family for mod in (llava, llava_next, qwen2_vl) for t in mod.Family.model_types}


def supported() -> str:
    return ", ".join(sorted({c.class_name for c in FAMILIES.values()}))


def family_for(model):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = FAMILIES.get(model_type)
    if cls is None:
        raise ValueError(
            f"mmsink: unsupported model {type(model).__name__} (model_type={model_type!r}); "
            f"supported: {supported()}"
        )
    return cls(model)
