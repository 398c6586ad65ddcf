"""The protocol between the core and a model family (one adapter per family in ``mmsink.patches``).

A family says where its decoder layers, projector and vision tower are, builds the prefill's Layout,
and hands vision-stage pruners the tower's tokens (``VisionTokens``): scores, keys and the map from
tower tokens to sequence tokens. What a family's hooks may see of the wrapped model is a ``Seam``, not
the handle. Families share no code by inheritance: each subclasses this protocol only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .flops import linear_params
from .plan import LMParts


@dataclass
class VisionTokens:
    """The projector's input as rows of tower tokens (a row: one image, or one tile of it), with what a
    vision-stage pruner ranks and merges by. Rows may be padded: ``present`` marks real tokens."""

    features: torch.Tensor  # [R, P, F] the projector's input
    scores: torch.Tensor  # [R, P] importance: the [CLS] query's attention at the feature layer (mean over
    # heads), or, in towers without [CLS], the attention each token receives there
    keys: torch.Tensor  # [R, P, d] the feature layer's keys, mean over heads
    sizes: list  # per row, its real tokens (host ints)
    parts: list  # per row, how many rows share its image's budget (LLaVA-NeXT tiles)
    present: torch.Tensor | None  # [R, P] bool, None when every token of every row is real
    to_sequence: Callable  # keep [R, P] bool -> keep over the sequence's image tokens, in order (any dtype:
    # an index tensor maps too; tokens with no row, e.g. LLaVA-NeXT's newlines, get 0 / False)
    put: Callable  # new features [R, P, F] -> the projector's input, in the model's own layout
    flops: float = 0  # work spent computing the scores (counted in the prefill's FLOPs)
    cls: torch.Tensor | None = None  # [R, F] each row's [CLS] token at the feature layer, in the features'
    # space (CLIP towers whose rows drop it, vision_feature_select_strategy "default"); None: no [CLS]
    # (Qwen) or the rows hold it already
    cls_in_row: bool = False  # slot 0 of every row is the [CLS] token itself ("full" strategy); its score
    # is its own attention


class Seam:
    """What a family's hooks may read of the wrapped model: the prefill running now, and the last layout
    with the input ids it was built from."""

    def __init__(self, handle):
        self._handle = handle

    def prefill(self):
        from .plan import Prefill

        ctx = self._handle.ctx
        return ctx if isinstance(ctx, Prefill) else None

    @property
    def measuring(self) -> bool:
        return self._handle.measuring

    def layout_of(self, input_ids):
        """The last prefill's Layout when it was built from exactly these ids, else None."""
        h = self._handle
        return h.last_layout if h.layout_ids is input_ids else None


class Family:
    """Defaults shared by every family; an adapter sets ``model_types``, ``class_name`` and the parts
    below, and overrides what differs."""

    model_types: tuple = ()
    class_name = ""
    mrope = False  # 3-D rotary positions: decoding continues from the prefill's rope deltas

    def __init__(self, model, language_model, projector):
        self.model = model
        self.config = model.config
        self.text_config = model.config.text_config
        self.language_model = language_model
        self.layers = list(language_model.layers)
        self.projector = projector  # receives the vision features (ViT sinks, vision-stage pruners)
        self._linear: dict = {}

    @property
    def lm_parts(self) -> LMParts:
        """Decoder layers, final norm and the text model's own rotary function (from its modeling module)."""
        rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        return LMParts(self.layers, self.language_model.norm, rope)

    def linear(self, module) -> int:
        """``linear_params(module)``, once per wrap (stats would walk the tower after every prefill)."""
        if id(module) not in self._linear:
            self._linear[id(module)] = (
                module,
                linear_params(module),
            )  # the module kept: its id stays its own
        return self._linear[id(module)][1]

    # ---- what every family provides
    tokens_per_image: int | None = None  # fixed visual tokens per image, where the family has a number

    def layout(self, input_ids, attention_mask, prompt_len, kwargs=None, grids: bool = False):
        raise NotImplementedError

    def vit_norms(self, features, kwargs) -> list:
        """Per image, the norm of each visual token's tower feature, in sequence order."""
        raise NotImplementedError

    def vision_flops(self, pixel_values, kwargs=None) -> int:
        raise NotImplementedError

    def image_vision_flops(self, pixel_values, kwargs=None) -> list:
        raise NotImplementedError

    # ---- optional
    def vision_taps(self) -> list:
        """[(name, module, kind)]: what a vision-stage pruner's scores are computed from; kind "output"
        records the module's output, "kwargs" its keyword inputs. Empty: the family has none."""
        return []

    def vision_tokens(self, features, kwargs, taps: dict) -> VisionTokens:
        raise ValueError(f"mmsink: {self.class_name} has no vision-stage token map")

    def install(self, seam: Seam) -> list:
        """Extra hooks the family needs; returns handles with ``remove()``."""
        return []

    def reset_measure(self) -> None:
        pass

    def host_inputs(self, kwargs: dict) -> None:
        """Move to the host, in place, the small inputs the model only ever reads there."""

    def rope_deltas(self):
        """[B, 1] rotary offsets of the last prefill (3-D positions), or None."""
        return None

    def graphable_tower(self):
        """(the vision tower, the hidden-state indices the model reads) when the tower's shapes depend on the
        pixel tensor's shape alone (so it can be replayed as a CUDA graph), else None."""
        return None
