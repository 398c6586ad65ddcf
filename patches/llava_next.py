"""LLaVA-NeXT (transformers ``LlavaNextForConditionalGeneration``): anyres tiling (base image + crops,
unpadded, with an ``image_newline`` token after each row), so an image's token count varies with its size.

Every visual token (newline tokens included) carries the image token id, so the Layout is the same as
LLaVA's; an image is a contiguous run of image tokens (images back to back with no text between them
count as one image for per-image budgets). Methods that work on vision-tower tokens (VisionZip, ViT-sink
forwarding) map them to sequence tokens by running the model's own packing (unpadding, newline tokens)
on token indices instead of features. pool pools each grid of an image (the base tile, the unpadded
crops) on its own and drops the newline tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from mmsink.core.bind import Bound
from mmsink.core.family import Family as Protocol
from mmsink.core.family import VisionTokens
from mmsink.core.layout import build_layout

from . import clip


class Family(Protocol):
    model_types = ("llava_next",)
    class_name = "LlavaNextForConditionalGeneration"

    def __init__(self, model):
        if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "language_model"):
            raise ValueError(
                f"mmsink: wrap the {self.class_name} (with its lm_head), not {type(model).__name__}"
            )
        super().__init__(model, model.model.language_model, model.model.multi_modal_projector)
        self._token_maps: dict = {}
        self._device_maps: dict = {}

    def token_map(self, features, kwargs, on_host: bool = False):
        """(source, lengths): for every visual token of the sequence, in order, its row in the flattened
        projector input [tiles * tokens] (-1 for newline tokens), and each image's token count. Built by
        the model's own ``pack_image_features`` applied to row indices, on the host (it is a few hundred
        small ops) and kept per (tile grid, image sizes); ``on_host``: return the host copy."""
        src, lens = self.host_token_map(features.shape[0], features.shape[1], kwargs)
        return (src if on_host else src.to(features.device, non_blocking=True)), lens

    def host_token_map(self, tiles: int, per: int, kwargs):
        counts = self.tiles(kwargs.get("pixel_values"), kwargs)
        if sum(counts) != tiles:
            raise ValueError(
                f"mmsink: {tiles} tiles in the projector input, the image sizes give {sum(counts)}"
            )
        return self.packing(tuple(counts), per, host_sizes(kwargs))

    def packing(self, counts: tuple, per: int, sizes: tuple):
        """(source, lengths) of ``token_map`` for images of ``counts`` tiles of ``per`` tokens each."""
        key = (counts, per, sizes)
        maps = self._token_maps
        if key not in maps:
            if len(maps) >= 16:
                maps.pop(next(iter(maps)))
            rows = torch.arange(sum(counts) * per, dtype=torch.float32).view(-1, per, 1)
            inner = self.model.model  # the class's own packing (the instance's is ours, see ``install``)
            packed, lens = type(inner).pack_image_features(
                inner,
                list(rows.split(list(counts))),
                torch.tensor(sizes),
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
                image_newline=torch.full((1,), -1.0),
            )
            maps[key] = (torch.cat(packed).view(-1).round().long(), [int(n) for n in lens])
        return maps[key]

    def device_map(self, counts, per: int, sizes: tuple, device) -> DeviceMap:
        """``packing``'s map as index tensors on ``device``, kept with it: placing an image's features,
        mapping a keep set to the sequence and the tiles' present tokens cost no host work after the
        first prefill of a size."""
        counts = tuple(counts)
        key = (counts, per, sizes, device)
        maps = self._device_maps
        if key not in maps:
            if len(maps) >= 16:
                maps.pop(next(iter(maps)))
            src, lens = self.packing(counts, per, sizes)
            tiles = sum(counts)
            present = torch.zeros(tiles * per, dtype=torch.bool)
            present[src[src >= 0]] = True
            present = present.view(tiles, per)
            line = src < 0
            maps[key] = DeviceMap(
                src.clamp(min=0).to(device),
                line.to(device),
                line.nonzero()[:, 0].to(device),
                lens,
                torch.tensor(lens, device=device),
                present.to(device),
                present.sum(1).tolist(),
            )
        return maps[key]

    def pool_grids(self, kwargs) -> list | None:
        """Per image (in input order): (its token count, its token grids as (offset, rows, cols, stride)
        within its run): the base tile's grid, then the unpadded crop grid whose rows end in a newline
        token (stride cols + 1; newline tokens are in no grid). None when tiles keep their [CLS] token."""
        if self.config.vision_feature_select_strategy != "default":
            return None
        v = self.config.vision_config
        side = v.image_size // v.patch_size
        per = side * side
        src, lens = self.host_token_map(sum(self.tiles(kwargs.get("pixel_values"), kwargs)), per, kwargs)
        out = []
        for part in src.split(lens):
            grids = [(0, side, side, side)]
            rest = part[per:]
            lines = int((rest < 0).sum())
            if lines and rest.numel() > lines:  # crops: `lines` rows of (numel / lines - 1) tokens + newline
                cols = rest.numel() // lines - 1
                grids.append((per, lines, cols, cols + 1))
            out.append((part.numel(), grids))
        return out

    def layout(self, input_ids, attention_mask, prompt_len, kwargs=None, grids: bool = False):
        lay = build_layout(input_ids, attention_mask, self.config.image_token_id, None, prompt_len, None)
        kwargs = kwargs or {}
        if grids and kwargs.get("pixel_values") is not None and kwargs.get("image_sizes") is not None:
            images = self.pool_grids(kwargs)
            if images is not None:
                lay.grids = runs_of(images, lay.sizes)
        return lay

    def vit_norms(self, features, kwargs) -> list:
        """Per image, the norm of each visual token's tower feature in sequence order (newlines: 0)."""
        m = self.device_map(
            self.tiles(kwargs.get("pixel_values"), kwargs),
            features.shape[1],
            host_sizes(kwargs),
            features.device,
        )
        norms = features.float().norm(dim=-1).view(-1)
        return list(m.gather(norms, 0.0).split(m.lens))

    def vision_taps(self) -> list:
        return clip.cls_taps(self.model)

    def vision_tokens(self, features, kwargs, taps: dict) -> VisionTokens:
        """One row per tile ([CLS] attention in each tile; the image's budget shared evenly by its tiles, as
        the paper runs LLaVA-NeXT); tokens that unpadding drops are not present; kept tokens map to
        sequence order through the model's own packing, newline tokens dropped."""
        counts = self.tiles(kwargs.get("pixel_values"), kwargs)
        per_tile = [n for n in counts for _ in range(n)]  # each tile: how many tiles its image has
        m = self.device_map(counts, features.shape[1], host_sizes(kwargs), features.device)
        return clip.vision_tokens(  # each tile has its own [CLS]
            self.model,
            features,
            taps,
            m.sizes,
            per_tile,
            m.present,
            lambda keep: m.gather(keep.reshape(-1), False),
        )

    def install(self, seam) -> list:
        """The image placeholders are checked against the layout's host counts; a prefill packs the
        projected tiles by one gather (``bind_packing``)."""
        return [clip.bind_placeholder_check(self.model.model, seam), bind_packing(self, seam)]

    def tower_input(self, kwargs: dict):
        """The vision tower's input as ``get_image_features`` makes it from ``pixel_values`` [images, tiles,
        3, H, W] (each image's first tiles, as many as its size gives, concatenated): ``generate_fast``
        launches the tower's graph with it before the forward. None when the pixels are not of that form.
        Needs ``image_sizes`` on the host (``host_inputs``)."""
        pix = kwargs.get("pixel_values")
        if not isinstance(pix, torch.Tensor) or pix.dim() != 5 or kwargs.get("image_sizes") is None:
            return None
        counts = self.tiles(pix, kwargs)
        if len(counts) == 1:  # the graph's input copy reads it: no concatenated copy first
            return pix[0, : counts[0]]
        return torch.cat([p[:n] for p, n in zip(pix, counts)])

    def graphable_tower(self):
        return self.model.model.vision_tower, clip.feature_layers(self.model)

    def regcache_tower(self):
        return clip.regcache_tower(self.model)

    @property
    def tokens_per_image(self):
        return None

    def grid_of(self, n: int):
        return None

    def host_inputs(self, kwargs: dict) -> None:
        """``image_sizes`` to the host: transformers reads them there element by element (tile counts
        before the tower; unpadding and grid shapes after it, where each read on a device tensor would
        make the host wait for the tower), as do this adapter's token maps. One read, at the start."""
        s = kwargs.get("image_sizes")
        if isinstance(s, torch.Tensor) and s.device.type != "cpu":
            kwargs["image_sizes"] = s.cpu()

    def tiles(self, pixel_values, kwargs) -> list[int]:
        sizes = (kwargs or {}).get("image_sizes")
        if pixel_values.dim() == 5 and sizes is not None:
            v = self.config.vision_config
            return [
                image_size_to_num_patches(
                    image_size=s, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=v.image_size
                )
                for s in host_sizes(kwargs)
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
        return clip.tower_flops(self, tiles, (v.image_size // v.patch_size) ** 2)


def host_sizes(kwargs) -> tuple:
    """The images' (height, width) as host ints (``image_sizes``: a tensor or a list)."""
    sizes = kwargs.get("image_sizes")
    return tuple(
        tuple(int(x) for x in s) for s in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)
    )


@dataclass(frozen=True)
class DeviceMap:
    """The packing of one tile grid and image sizes (``Family.packing``) on a device."""

    src: torch.Tensor  # [N] row of the flattened projector input for every visual token (0 for newlines)
    line: torch.Tensor  # [N] bool: newline tokens
    lines: torch.Tensor  # [K] their positions
    lens: list  # tokens per image (host ints)
    lens_t: torch.Tensor  # the same on the device (what ``pack_image_features`` returns)
    present: torch.Tensor  # [tiles, per] bool: tokens unpadding keeps
    sizes: list  # present tokens per tile (host ints)

    def gather(self, values: torch.Tensor, fill) -> torch.Tensor:
        """values[src] (rows of the flattened projector input), ``fill`` at newline tokens."""
        return values[self.src].masked_fill_(self.line.view(-1, *[1] * (values.dim() - 1)), fill)


def bind_packing(family, seam) -> Bound:
    """``pack_image_features`` on this one model instance, during a wrapped prefill: the same features in
    the same order, by one gather of the projected rows (the packing's map is kept per tile grid and
    image sizes) and one write of the newline rows, instead of per-image reshapes, unpadding and
    concatenations; the lengths tensor is kept too. Other calls (image sizes on the device, no newline
    token, outside a prefill) run the previous method."""

    def make(previous):
        def pack_image_features(
            self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None
        ):
            feats = list(image_features)
            if (
                not seam.measuring
                or image_newline is None
                or not feats
                or (isinstance(image_sizes, torch.Tensor) and image_sizes.device.type != "cpu")
                or any(f.dim() != 3 or f.shape[1:] != feats[0].shape[1:] for f in feats)
            ):
                return previous(image_features, image_sizes, vision_feature_select_strategy, image_newline)
            sizes = host_sizes({"image_sizes": image_sizes})
            m = family.device_map([f.shape[0] for f in feats], feats[0].shape[1], sizes, feats[0].device)
            flat = (feats[0] if len(feats) == 1 else torch.cat(feats)).flatten(0, 1)
            out = flat.index_select(0, m.src)
            out.index_put_((m.lines,), image_newline.to(out.device, out.dtype))
            return list(out.split(m.lens)), m.lens_t

        return pack_image_features

    return Bound(family.model.model, "pack_image_features", make)


def runs_of(images: list, sizes: list) -> list:
    """Per sample, per image run of the layout (images back to back form one run), the grids of the
    images in it with offsets from the run's start. ``images``: per image in input order, (token count,
    grids) as ``pool_grids`` gives them; ``sizes``: the layout's token count of each run."""
    it = iter(images)
    out = []
    for row in sizes:
        runs = []
        for n in row:
            run, at = [], 0
            while at < n:
                count, grids = next(it)
                run += [(at + o, r, c, st) for o, r, c, st in grids]
                at += count
            runs.append(run)
        out.append(runs)
    return out
