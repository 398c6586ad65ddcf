"""What the two LLaVA families share about a CLIP-style tower with a [CLS] token: the feature layer's
attention (vision-stage scores), the tower's FLOPs, and the image-placeholder check. Functions, not a base
class: each family uses them as it needs."""

from __future__ import annotations

import torch

from mmsink.core.bind import Bound
from mmsink.core.family import VisionTokens


def feature_attention(model):
    """The attention module of the vision layer whose output feeds the projector."""
    layer = model.config.vision_feature_layer
    layer = layer if isinstance(layer, int) else layer[-1]
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    return layers[layer % (len(layers) + 1) - 1].self_attn


def feature_layers(model) -> tuple:
    layer = model.config.vision_feature_layer
    return (layer,) if isinstance(layer, int) else tuple(layer)


def hidden_module(model, index: int):
    """The module whose output is the tower's ``hidden_states[index]`` (a layer, or the pre-layernorm)."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    layers = vm.encoder.layers
    i = index % (len(layers) + 1)
    return layers[i - 1] if i else vm.pre_layrnorm


def cls_taps(model) -> list:
    """The feature layer's query and key projections (scores, keys) and the outputs of the feature
    layer(s), whose row 0 is the [CLS] token (VisionZip keeps it)."""
    attn = feature_attention(model)
    hidden = [(f"hidden{j}", hidden_module(model, i), "output") for j, i in enumerate(feature_layers(model))]
    return [("q", attn.q_proj, "output"), ("k", attn.k_proj, "output"), *hidden]


def cls_features(model, taps: dict):
    """[I, F] the [CLS] token of each tile at the feature layer(s) (concatenated as the model concatenates
    several feature layers), or None when the projector's rows hold it already ("full" strategy)."""
    if model.config.vision_feature_select_strategy != "default":
        return None
    parts = [taps[f"hidden{j}"][:, 0] for j in range(len(feature_layers(model)))]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def cls_scores(model, taps: dict, n_features: int):
    """(scores [I, P], keys [I, P, d], flops) of the feature layer for the last ``n_features`` tokens of
    each tile: the [CLS] query's attention (mean over heads; only that row is computed) and the keys
    (mean over heads)."""
    attn = feature_attention(model)
    q, k = taps["q"], taps["k"]  # [I, 1+P, H*hd]
    n_img, n_tok, _ = k.shape
    heads = attn.num_heads
    hd = k.shape[-1] // heads
    qh = q[:, 0].view(n_img, heads, hd)
    kh = k.view(n_img, n_tok, heads, hd)
    cls = torch.softmax(torch.einsum("ihd,inhd->ihn", qh.float(), kh.float()) * attn.scale, -1).mean(1)
    offset = n_tok - n_features  # 1 when the class token was dropped ("default")
    return cls[:, offset:], kh[:, offset:].float().mean(2), 2 * n_img * heads * n_tok * hd


def vision_tokens(model, features, taps: dict, sizes, parts, present, to_sequence) -> VisionTokens:
    """The rows of a CLIP tower's projector input with the feature layer's [CLS] scores, keys and [CLS]
    features (the rows' order and map to the sequence are the family's)."""
    scores, keys, flops = cls_scores(model, taps, features.shape[1])
    cls = cls_features(model, taps)
    return VisionTokens(
        features,
        scores,
        keys,
        sizes,
        parts,
        present,
        to_sequence,
        lambda f: f,
        flops,
        cls=None if cls is None else cls.to(features.dtype),
        cls_in_row=model.config.vision_feature_select_strategy == "full",
    )


def tower_flops(family, tiles: int, n_patch: int) -> int:
    """Tower (patch embedding, linears, attention) and projector FLOPs over ``tiles`` tiles."""
    model = family.model
    v = model.config.vision_config
    p = v.patch_size
    n = n_patch + 1  # class token
    conv = 2 * tiles * n_patch * v.hidden_size * v.num_channels * p * p
    attn = v.num_hidden_layers * 4 * tiles * n * n * v.hidden_size
    n_feat = n if model.config.vision_feature_select_strategy == "full" else n_patch
    proj = 2 * tiles * n_feat * family.linear(family.projector)
    return conv + 2 * tiles * n * family.linear(model.model.vision_tower) + attn + proj


def bind_placeholder_check(inner, seam) -> Bound:
    """``get_placeholder_mask`` on this one model instance: the same mask, and the same check of image
    tokens against image features, counted from the prefill layout's host sizes instead of a sum on the
    device (a read that made the host wait for the vision tower before it could queue the decoder).
    Falls back to the previous method when the layout is not of these ids."""

    def make(previous):
        def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
            lay = seam.layout_of(input_ids) if input_ids is not None else None
            if lay is None:
                return previous(input_ids, inputs_embeds, image_features)
            tokens = sum(n for row in lay.sizes for n in row)
            if tokens * inputs_embeds.shape[-1] != image_features.numel():
                raise ValueError(
                    f"Image features and image tokens do not match, tokens: {tokens}, "
                    f"features: {image_features.numel() // inputs_embeds.shape[-1]}"
                )
            return (input_ids == self.config.image_token_id).unsqueeze(-1).to(inputs_embeds.device)

        return get_placeholder_mask

    return Bound(inner, "get_placeholder_mask", make)


def regcache_tower(model):
    """RegCache's view of a CLIP tower: its encoder layers, their keys and values (layer norm, then the
    projections), the linears that are quantized, and the feature-layer output the projector reads
    (LLaVA-NeXT's tiles flattened: each tile is one image to the tower)."""
    tower = model.model.vision_tower
    layers = list(getattr(tower, "vision_model", tower).encoder.layers)
    heads = model.config.vision_config.num_attention_heads

    def kv(i, rows):
        layer = layers[i]
        x = layer.layer_norm1(rows)
        a = layer.self_attn
        return a.k_proj(x).view(len(rows), heads, -1), a.v_proj(x).view(len(rows), heads, -1)

    def linears(i):
        a, m = layers[i].self_attn, layers[i].mlp
        return [a.q_proj, a.k_proj, a.v_proj, a.out_proj, m.fc1, m.fc2]

    def run(batch):
        pv = batch["pixel_values"]
        pv = pv.flatten(0, 1) if pv.dim() == 5 else pv
        hs = tower(pv.to(tower.dtype), output_hidden_states=True).hidden_states
        return torch.cat([hs[i] for i in feature_layers(model)], -1)

    attns = [layer.self_attn for layer in layers]
    return dict(tower=tower, blocks=layers, attns=attns, kv=kv, linears=linears, run=run, lead=1)
