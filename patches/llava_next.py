"""LLaVA-NeXT (transformers ``LlavaNextForConditionalGeneration``): anyres tiling (base image + crops,
unpadded, with an ``image_newline`` token after each row), so an image's token count varies with its size.

Every visual token (newline tokens included) carries the image token id, so the Layout is the same as
LLaVA's; an image is a contiguous run of image tokens (images back to back with no text between them
count as one image for per-image budgets). Methods that need one token grid per image or a one-to-one
map from vision-tower tokens to sequence tokens (pool, visionzip, sink_forward) are refused at wrap time.
"""

from __future__ import annotations

from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from mmsink.flops import linear_params
from mmsink.layout import build_layout

from .llava import Family as LlavaFamily

NO_GRID = "its visual tokens are several unpadded tile grids with newline tokens, not one grid"


class Family(LlavaFamily):
    model_types = ("llava_next",)
    class_name = "LlavaNextForConditionalGeneration"
    unsupported = {"pool": NO_GRID, "visionzip": NO_GRID, "sink_forward": NO_GRID}

    @property
    def tokens_per_image(self):
        return None

    def grid_of(self, n: int):
        return None

    def layout(self, input_ids, attention_mask, prompt_len, kwargs=None):
        return build_layout(input_ids, attention_mask, self.config.image_token_id, None, prompt_len, None)

    def tiles(self, pixel_values, kwargs) -> list[int]:
        sizes = (kwargs or {}).get("image_sizes")
        if pixel_values.dim() == 5 and sizes is not None:
            v = self.config.vision_config
            return [
                image_size_to_num_patches(
                    image_size=s, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=v.image_size
                )
                for s in sizes
            ]
        per = pixel_values.shape[1] if pixel_values.dim() == 5 else 1
        return [per] * pixel_values.shape[0]

    def image_vision_flops(self, pixel_values, kwargs=None) -> list[float]:
        if pixel_values is None:
            return []
        return [self.tile_flops(t) for t in self.tiles(pixel_values, kwargs)]

    def vision_flops(self, pixel_values, kwargs=None) -> int:
        """The tower runs on every tile of every image (base + crops); the projector on their tokens."""
        if pixel_values is None:
            return 0
        return self.tile_flops(sum(self.tiles(pixel_values, kwargs)))

    def tile_flops(self, tiles: int) -> int:
        v = self.config.vision_config
        p = v.patch_size
        n_patch = (v.image_size // p) ** 2
        n = n_patch + 1
        tower = self.model.model.vision_tower
        conv = 2 * tiles * n_patch * v.hidden_size * v.num_channels * p * p
        attn = v.num_hidden_layers * 4 * tiles * n * n * v.hidden_size
        n_feat = n if self.config.vision_feature_select_strategy == "full" else n_patch
        proj = 2 * tiles * n_feat * linear_params(self.model.model.multi_modal_projector)
        return conv + 2 * tiles * n * linear_params(tower) + attn + proj
