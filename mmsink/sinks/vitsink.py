"""ViT-sink forwarding ("To Sink or Not to Sink", Luo et al., ICLR 2026).

High-norm tokens of the vision features handed to the projector carry global image information. We
detect them per image (an absolute norm threshold where one is known, else norm > factor x the image's
median norm), protect them from every pruner at every stage (they are kept in addition to the budget),
and optionally move them to the front of their image's token span: sinks take the first positions of
the span, the other tokens keep their order in the positions after them.
"""

from __future__ import annotations

import dataclasses

import torch

# Vision towers whose sink norms were measured in the paper: CLIP ViT-L/14-336 (LLaVA-1.5): ordinary
# tokens < 60, sinks > 100.
KNOWN_THRESHOLDS = {("clip_vision_model", 1024, 24, 336, 14): 100.0}


@dataclasses.dataclass
class SinkForwardConfig:
    threshold: float | None = None  # absolute norm; None: the known value for this tower, else adaptive
    factor: float = 3.0  # adaptive rule: norm > factor x median norm of the image
    max_sinks: int = 16  # per image, the highest norms first
    to_front: bool = False

    def __post_init__(self):
        if self.threshold is not None and self.threshold <= 0:
            raise ValueError("mmsink: sink_forward threshold must be > 0")
        if self.factor <= 1:
            raise ValueError("mmsink: sink_forward factor must be > 1 (a multiple of the median norm)")
        if self.max_sinks < 1:
            raise ValueError("mmsink: sink_forward max_sinks must be >= 1")


def make_config(value) -> SinkForwardConfig | None:
    if value is None or value is False:
        return None
    if value is True:
        return SinkForwardConfig()
    if isinstance(value, SinkForwardConfig):
        return value
    if isinstance(value, dict):
        return SinkForwardConfig(**value)
    raise ValueError(
        f"mmsink: sink_forward must be True, a dict or a SinkForwardConfig, not {type(value).__name__}"
    )


def known_threshold(vision_config) -> float | None:
    key = (
        getattr(vision_config, "model_type", None),
        getattr(vision_config, "hidden_size", None),
        getattr(vision_config, "num_hidden_layers", None),
        getattr(vision_config, "image_size", None),
        getattr(vision_config, "patch_size", None),
    )
    return KNOWN_THRESHOLDS.get(key)


def detect(norms: torch.Tensor, cfg: SinkForwardConfig, threshold: float | None) -> torch.Tensor:
    """norms [tokens] of one image's visual tokens -> sink mask [tokens]."""
    if threshold is not None:
        sink = norms > threshold
    else:
        sink = norms > cfg.factor * norms.median()
    k = min(cfg.max_sinks, norms.shape[0])  # at most max_sinks, highest norm first
    top = norms.masked_fill(~sink, float("-inf")).topk(k).indices
    return torch.zeros_like(sink).scatter(0, top, True) & sink


def to_front_order(sink: torch.Tensor) -> torch.Tensor:
    """[..., tokens] permutation putting sinks first (both groups keep their order)."""
    n = sink.shape[-1]
    ar = torch.arange(n, device=sink.device)
    return torch.where(sink, ar, n + ar).argsort(dim=-1)


def place(ctx, hidden, cfg: SinkForwardConfig, threshold: float | None):
    """Detect sinks per image from ``ctx.vit``; protect them; with to_front, move them to the front of
    their image's span. Records what was found in ``ctx.vit_sinks``; returns the hidden states."""
    lay = ctx.layout
    flat = lay.is_image.nonzero()  # (sample, position) of every image token, in feature order
    if flat.shape[0] != sum(n.numel() for n in ctx.vit):
        raise ValueError("mmsink: image features and image tokens do not line up for sink detection")
    sinks = ctx.vit_sink_mask or [detect(n, cfg, threshold) for n in ctx.vit]
    orders, start = [], 0
    for s in sinks:
        order = to_front_order(s) if cfg.to_front else torch.arange(s.numel(), device=s.device)
        orders.append(order + start)
        start += s.numel()
    order = torch.cat(orders)
    sink, norms = torch.cat(sinks)[order], torch.cat(ctx.vit)[order]
    patch = torch.cat([torch.arange(s.numel(), device=s.device) for s in sinks])[order]
    if cfg.to_front:
        ctx.vit_order = order
        hidden = hidden.clone()
        hidden[flat[:, 0], flat[:, 1]] = hidden[flat[:, 0], flat[:, 1]][order.to(hidden.device)]
    ctx.protected = torch.zeros_like(lay.is_image)
    ctx.protected[flat[:, 0], flat[:, 1]] = sink.to(lay.is_image.device)
    ctx.vit_sinks = [[] for _ in range(lay.batch)]
    for i in sink.nonzero().squeeze(1).tolist():
        b, pos = flat[i].tolist()
        ctx.vit_sinks[b].append({"position": pos, "patch": int(patch[i]), "norm": round(float(norms[i]), 3)})
    return hidden
