"""LLaVA-1.5 (transformers ``LlavaForConditionalGeneration``)."""

from __future__ import annotations

import math

from mmsink.core.family import Family as Protocol
from mmsink.core.family import VisionTokens
from mmsink.core.layout import build_layout

from . import clip


class Family(Protocol):
    model_types = ("llava",)
    class_name = "LlavaForConditionalGeneration"

    def __init__(self, model):
        if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "language_model"):
            raise ValueError(
                f"mmsink: wrap the {self.class_name} (with its lm_head), not {type(model).__name__}"
            )
        super().__init__(model, model.model.language_model, model.model.multi_modal_projector)

    @property
    def tokens_per_image(self) -> int:
        v = self.config.vision_config
        n = (v.image_size // v.patch_size) ** 2
        return n + 1 if self.config.vision_feature_select_strategy == "full" else n

    def grid_of(self, n: int):
        side = math.isqrt(n)
        return (side, side) if side * side == n else None

    def layout(self, input_ids, attention_mask, prompt_len, kwargs=None, grids: bool = False):
        """The prefill's Layout; ``grids``: a pruner reads the image grids (here they cost nothing)."""
        return build_layout(
            input_ids,
            attention_mask,
            self.config.image_token_id,
            self.tokens_per_image,
            prompt_len,
            self.grid_of,
        )

    def vit_norms(self, features, kwargs) -> list:
        """Norm of each visual token's vision feature (the projector input), one vector per image."""
        return list(features.float().norm(dim=-1))

    def vision_taps(self) -> list:
        return clip.cls_taps(self.model)

    def vision_tokens(self, features, kwargs, taps: dict) -> VisionTokens:
        """One row per image, in input order (the sequence's order of images); ``cls``: each image's [CLS]
        token at the feature layer (the projector's rows drop it)."""
        n, p = features.shape[:2]
        return clip.vision_tokens(
            self.model, features, taps, [p] * n, [1] * n, None, lambda keep: keep.reshape(-1)
        )

    def install(self, seam) -> list:
        """The image placeholders are checked against the layout's host counts."""
        return [clip.bind_placeholder_check(self.model.model, seam)]

    def graphable_tower(self):
        return self.model.model.vision_tower, clip.feature_layers(self.model)

    def regcache_tower(self):
        return clip.regcache_tower(self.model)

    def image_vision_flops(self, pixel_values, kwargs=None) -> list[float]:
        """Vision tower + projector FLOPs of each image, in input order."""
        if pixel_values is None:
            return []
        n = pixel_values.shape[0]
        return [self.vision_flops(pixel_values, kwargs) / n] * n

    def vision_flops(self, pixel_values, kwargs=None) -> int:
        if pixel_values is None:
            return 0
        p = self.config.vision_config.patch_size
        n_patch = (pixel_values.shape[-2] // p) * (pixel_values.shape[-1] // p)
        return clip.tower_flops(self, pixel_values.shape[0], n_patch)
