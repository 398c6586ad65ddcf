"""Plain ports of the OFFICIAL selection rules of the vision-stage peers, written from the logic of each
official repository (read, not copied), for the tiny LLaVA models of ``tiny.py``: the tower runs eagerly
with ``output_attentions=True`` and ``output_hidden_states=True`` (as the official code runs it), one image
per row, all its patches. Each returns, per image, the kept patch indices (0-based over the patches, [CLS]
excluded), sorted.

- SCOPE: kinredon/SCOPE, ``scope/clip_encoder.py`` (``CLIPVisionTower_SCOPE.forward`` and ``SCOPE``):
  layer -2 patch features, cosine similarity, saliency = [CLS] row of attentions[-2] summed over heads;
  greedy gain_j = sum_i max(0, S_ij - cur_max_i) * saliency_j ** alpha, cur_max from 0.
- VisPruner: Theia-4869/VisPruner, ``llava/model/llava_arch.py`` (``encode_images``) and
  ``llava/model/multimodal_encoder/clip_encoder.py`` (``feature_select``): T_imp = int(T * ratio) by the
  [CLS] row of attentions[-2] averaged over heads; the rest, in attention order, alternate into a and b;
  each round drops the r = min(8, R - T_div) a-tokens with the highest max-cosine to b. The official code
  cannot run a round with an odd R (its gather is sized R // 2 - r); the port keeps the len(a) - r others,
  as mmsink does (``odd="mmsink"``), or raises as the official code would (``odd="official"``).
- VisionZip: ``official.visionzip_official`` (the other helper's port).
"""

from __future__ import annotations

import torch


def tower_outputs(model, pixel_values):
    """(features [I, P, F] = hidden_states[-2] patches, cls rows [I, H, P] = attentions[-2][:, :, 0, 1:])
    of an eager run of the tower, as the official code reads them."""
    tower = model.model.vision_tower
    prev = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        tower.set_attn_implementation(prev)
    return out.hidden_states[-2][:, 1:], out.attentions[-2][:, :, 0, 1:]


def scope_official(model, pixel_values, k, alpha=1.0):
    feats, att = tower_outputs(model, pixel_values)
    saliency = att.sum(1)  # summed over heads
    results = []
    for i in range(feats.shape[0]):
        x = feats[i] / feats[i].norm(dim=-1, keepdim=True)
        sim = x @ x.T
        n = sim.shape[0]
        chosen = []
        cur = torch.zeros(n)
        weight = saliency[i] ** alpha
        for _ in range(k):
            best, best_gain = None, None
            for j in range(n):
                if j in chosen:
                    continue
                gain = torch.clamp(sim[:, j] - cur, min=0).sum() * weight[j]
                if best_gain is None or gain > best_gain:  # the first maximum, as argmax
                    best, best_gain = j, gain
            chosen.append(best)
            cur = torch.maximum(cur, sim[best])
        results.append(sorted(chosen))
    return results


def vispruner_official(model, pixel_values, t, ratio=0.5, odd="mmsink"):
    feats, att = tower_outputs(model, pixel_values)
    score = att.mean(1)  # averaged over heads
    t_imp = int(t * ratio)
    t_div = t - t_imp
    results = []
    for i in range(feats.shape[0]):
        order = score[i].argsort(descending=True).tolist()
        important, residual = order[:t_imp], order[t_imp:]
        x = feats[i] / feats[i].norm(dim=-1, keepdim=True)
        while t_div > 0:
            r_len = len(residual)
            r = min(8, r_len - t_div)
            if r <= 0:
                break
            a, b = residual[0::2], residual[1::2]
            if len(a) != len(b) and odd == "official":
                raise RuntimeError("the official round cannot gather an odd leftover")
            best = (x[a] @ x[b].T).max(-1).values
            rank = best.argsort(descending=True).tolist()
            residual = [a[j] for j in rank[r:]] + b
        chosen = important + (residual if t_div > 0 else [])
        results.append(sorted(chosen))
    return results
