"""Plain ports of the official selection rules of the pre-LLM methods DivPrune and CDPruner, one image at a
time, written from the rules in the official repositories (vbdi/divprune ``LLaVA/llava/model/llava_arch.py``
``DivPrune``; Theia-4869/CDPruner ``llava/model/llava_arch.py`` ``encode_images`` and
``llava/model/multimodal_encoder/clip_encoder.py`` ``forward``). They share no code with mmsink."""

from __future__ import annotations

import torch


def divprune_keep(ratio_or_k, n: int) -> int:
    """The official ``int(round(ratio * N))`` for a ratio; an int is the count itself."""
    return int(round(ratio_or_k * n)) if isinstance(ratio_or_k, float) else ratio_or_k


def divprune(x: torch.Tensor, k: int) -> list[int]:
    """x [N, d]: one image's projected tokens. Greedy max-min on 1 - cos, as the official loop runs it:
    step 0 scores each column by its second smallest entry, later steps by the column's minimum over the
    rows already chosen; argmax; indices sorted."""
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - torch.mm(unit, unit.t())
    chosen = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            score = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            score = torch.min(torch.index_select(dist, 0, chosen[:i]), dim=0).values
        chosen[i] = torch.argmax(score)
    return sorted(chosen.tolist())


def cdpruner(
    features: torch.Tensor, image_embeds: torch.Tensor | None, text_embeds: torch.Tensor | None, t: int
):
    """features [B, N, D] projected tokens, image_embeds [B, N, C], text_embeds [M, C] (None: relevance 1
    and self-similarity exactly 1, the mmsink "none" variant). Returns the kept indices per row, sorted.
    The official arithmetic: float32
    similarity of normalised features, relevance = mean over text rows of -cos, min-max over the whole
    [B, N] tensor, kernel r S r, fast greedy MAP for exactly t steps."""
    b, n, _ = features.shape
    unit = (features / features.norm(dim=-1, keepdim=True)).float()
    sim = torch.matmul(unit, unit.transpose(1, 2))
    if image_embeds is None:  # the "none" variant: r = 1 and self-similarity exactly 1
        rel = torch.ones(b, n)
        sim.diagonal(dim1=1, dim2=2).fill_(1.0)
    else:
        ie = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        te = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        rel = (-torch.matmul(ie, te.t())).mean(dim=-1)
        rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    kernel = rel.unsqueeze(2) * sim * rel.unsqueeze(1)
    cis = torch.zeros(t, b, n)
    di2 = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    sel = torch.empty(t, b, dtype=torch.long)
    ar = torch.arange(b)
    for i in range(t):
        j = torch.argmax(di2, dim=-1)
        sel[i] = j
        residual = kernel[ar, j] - torch.einsum("tb,tbn->bn", cis[:i, ar, j], cis[:i])
        e = residual / torch.sqrt(di2[ar, j]).unsqueeze(-1)
        cis[i] = e
        di2 -= torch.square(e)
        di2[ar, j] = -float("inf")
    return [sorted(row) for row in torch.sort(sel.t()).values.tolist()]


def clip_text_embeds(clip, ids: list[int]) -> torch.Tensor:
    """The CLIP text tower on one question's token ids, cut into 77-token rows (zero-padded), as the
    official ``CLIPVisionTower.forward`` does: [rows, C]."""
    width = clip.text_model.config.max_position_embeddings
    v = torch.tensor([ids])
    rows = (v.shape[1] - 1) // width + 1
    pad = rows * width - v.shape[1]
    tid = torch.cat([v, v.new_zeros(1, pad)], 1).reshape(-1, width)
    mask = torch.cat([torch.ones_like(v), v.new_zeros(1, pad)], 1).reshape(-1, width)
    with torch.no_grad():
        return clip.text_projection(clip.text_model(input_ids=tid, attention_mask=mask).pooler_output)


def clip_image_embeds(model, clip, pixel_values) -> torch.Tensor:
    """LLaVA-1.5: the tower's layer -2 patch outputs through its post-layernorm and CLIP's visual
    projection (float32): [images, N, C]."""
    tower = model.model.vision_tower
    with torch.no_grad():
        hs = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        return clip.visual_projection(getattr(tower, "vision_model", tower).post_layernorm(hs).float())
