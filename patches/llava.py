"""LLaVA-1.5 (transformers ``LlavaForConditionalGeneration``)."""

from __future__ import annotations

import math
import sys
import types

from mmsink.flops import linear_params
from mmsink.layout import build_layout
from mmsink.plan import LMParts


class Family:
    model_types = ("llava",)
    class_name = "LlavaForConditionalGeneration"

    def __init__(self, model):
        if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "language_model"):
            raise ValueError(
                f"mmsink: wrap the {self.class_name} (with its lm_head), not {type(model).__name__}"
            )
        self.model = model
        self.config = model.config
        self.text_config = model.config.text_config
        self.language_model = model.model.language_model
        self.layers = list(self.language_model.layers)

    @property
    def lm_parts(self) -> LMParts:
        """Decoder layers, final norm and the text model's own rotary function (from its modeling module)."""
        rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        return LMParts(self.layers, self.language_model.norm, rope)

    def linear(self, module) -> int:
        """``linear_params(module)``, counted once per wrap: the walk over a tower's modules would
        otherwise run after every prefill (stats)."""
        cache = self.__dict__.setdefault("_linear", {})
        if id(module) not in cache:
            cache[id(module)] = (module, linear_params(module))  # the module kept: its id stays its own
        return cache[id(module)][1]

    @property
    def projector(self):
        """The module that receives the vision features (hooked for ViT-sink detection)."""
        return self.model.model.multi_modal_projector

    def vision_attention(self):
        """The attention module of the vision layer whose output feeds the projector."""
        layer = self.config.vision_feature_layer
        layer = layer if isinstance(layer, int) else layer[-1]
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return layers[layer % (len(layers) + 1) - 1].self_attn

    def install_vision_scoring(self, handle) -> list:
        """Hooks feeding a vision-stage pruner (VisionZip) the feature layer's queries and keys."""
        attn = self.vision_attention()
        pruner = handle.planner
        taps = [
            (proj, handle.vision_observer(fn))
            for proj, fn in ((attn.q_proj, pruner.observe_q), (attn.k_proj, pruner.observe_k))
        ]
        handle.vision_taps = taps  # a graphed tower (generate_fast) calls these after each replay
        return [proj.register_forward_hook(hook) for proj, hook in taps]

    def zip_features(self, pruner, ctx, features):
        """Projector input -> VisionZip-merged projector input (records the keep sets in ``ctx.run``)."""
        attn = self.vision_attention()
        return pruner.edit_features(ctx, features, attn.num_heads, attn.scale)

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

    def install(self, handle) -> list:
        """Extra hooks a family needs; returns their handles (``.remove()`` undoes each). LLaVA / NeXT:
        the image placeholders are checked against the layout's host counts."""
        return [bind_placeholder_check(self.model.model, handle)]

    def reset_measure(self):
        pass

    def host_inputs(self, kwargs: dict) -> None:
        """Move to the host, in place, the small inputs the model only ever reads there (none here)."""

    def image_vision_flops(self, pixel_values, kwargs=None) -> list[float]:
        """Vision tower + projector FLOPs of each image, in input order."""
        if pixel_values is None:
            return []
        n = pixel_values.shape[0]
        return [self.vision_flops(pixel_values, kwargs) / n] * n

    def vision_flops(self, pixel_values, kwargs=None) -> int:
        if pixel_values is None:
            return 0
        v = self.config.vision_config
        b = pixel_values.shape[0]
        p = v.patch_size
        n_patch = (pixel_values.shape[-2] // p) * (pixel_values.shape[-1] // p)
        n = n_patch + 1  # class token
        tower = self.model.model.vision_tower
        conv = 2 * b * n_patch * v.hidden_size * v.num_channels * p * p
        attn = v.num_hidden_layers * 4 * b * n * n * v.hidden_size
        n_feat = n if self.config.vision_feature_select_strategy == "full" else n_patch
        proj = 2 * b * n_feat * self.linear(self.model.model.multi_modal_projector)
        return conv + 2 * b * n * self.linear(tower) + attn + proj


class Unbind:
    """A hook-like handle whose ``remove()`` drops a method bound on one instance."""

    def __init__(self, obj, name: str):
        self.obj, self.name = obj, name

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)


def bind_placeholder_check(inner, handle) -> Unbind:
    """``get_placeholder_mask`` on this one model instance: the same mask, and the same check of image
    tokens against image features, counted from the prefill layout's host sizes instead of a sum on the
    device (a read that made the host wait for the vision tower before it could queue the decoder).
    Falls back to transformers' own when the layout is not of these ids."""
    original = type(inner).get_placeholder_mask

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        lay = handle.last_layout
        if input_ids is None or lay is None or handle.layout_ids is not input_ids:
            return original(self, input_ids, inputs_embeds, image_features)
        tokens = sum(n for row in lay.sizes for n in row)
        if tokens * inputs_embeds.shape[-1] != image_features.numel():
            raise ValueError(
                f"Image features and image tokens do not match, tokens: {tokens}, "
                f"features: {image_features.numel() // inputs_embeds.shape[-1]}"
            )
        return (input_ids == self.config.image_token_id).unsqueeze(-1).to(inputs_embeds.device)

    inner.get_placeholder_mask = types.MethodType(get_placeholder_mask, inner)
    return Unbind(inner, "get_placeholder_mask")
