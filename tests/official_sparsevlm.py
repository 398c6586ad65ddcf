"""Plain port of SparseVLM's OFFICIAL selection rule (Gumpest/SparseVLMs, default v1.5 logic), written
from the logic of the official repository (read, not copied), for the tiny transformers LLaVA models of
``tiny.py``: batch 1, no padding, one image, eager, the full attention matrix, every layer computed by
hand (``reference.layer_forward``).

- ``llava/model/language_model/modelling_sparse_llama.py``, ``LlamaDynamicvitModel.forward``: text raters
  from the input embeddings (``m_v_t``: softmax over the text after the image of V T^T, mean over the
  visual rows; raters = above the mean); at each layer of ``pruning_loc`` (2, 6, 15) the layer runs on
  every current token, its attention ranks the visual span, the layer's output is cut to the kept tokens
  and the merged tokens go right after the kept visual ones; position ids become 0..n-1.
- ``score.py``, ``attn_postprocess_topk``: attention averaged over heads, the raters' rows, the visual
  span's columns, averaged over the raters; topk of min(sparse_token_list[stage], v - 1).
  ``sparse_token_list_192/128/96/64``: the schedules.
- ``utils.py``, ``cluster_and_merge``: DPC-KNN over the top int(0.3 p) + 1 pruned tokens by score
  (in that score order), int(n / 10) + 1 clusters, each cluster's tokens averaged (sum / (count + 1e-6)).
  The official density gets uniform noise of 1e-6 (tie breaking); this port adds none (mmsink neither)
  and breaks exact ties by order (the first pooled token, i.e. the highest-scored, wins).

``positions``: "reindex" as the official code (0..n-1 after each decision, merged tokens after the kept
visual ones), "original" as mmsink (every token keeps its position, a merged token takes its centre's;
the sequence stays in position order). The first decision is the same in both.
"""

from __future__ import annotations

import torch
from reference import embed, layer_forward

# score.py: sparse_token_list_<RETAIN_TOKN> (v1.5, USE_VERSION unset), pruning_loc of LlamaDynamicvitModel
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
PRUNING_LOC = (2, 6, 15)


def cluster_and_merge_official(x, cluster_num):
    """One group x [N, C] -> (merged [cluster_num, C], centre index of each cluster)."""
    n, c = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / (c**0.5)
    nearest = torch.topk(dist, k=cluster_num, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    mask = (density[None, :] > density[:, None]).to(x.dtype)
    dist_max = dist.flatten().max()
    parent = (dist * mask + dist_max * (1 - mask)).min(dim=-1).values
    score = parent * density
    # official: topk of the score, densities carrying noise of 1e-6; without it, exact ties (every density
    # is exp(0) = 1 with one cluster: the official centre is then a random token) go to the first token
    centres = score.argsort(descending=True, stable=True)[:cluster_num]
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(cluster_num)
    weight = torch.zeros(cluster_num, 1).index_add_(0, assign, torch.ones(n, 1)) + 1e-6
    merged = torch.zeros(cluster_num, c).index_add_(0, assign, x * (1.0 / weight[assign]))
    return merged, centres


def sparsevlm_official(model, ids, pixel_values, layers, tokens, recycle=True, positions="reindex"):
    """Per decision layer: {"kept": sorted original positions of the visual tokens that go on (a merged
    token counted at its centre's position), "merged": {centre position: merged state}}."""
    lm = model.model.language_model
    x = embed(model, ids[None], pixel_values)[0]
    where = (ids == model.config.image_token_id).nonzero().squeeze(1)
    v_start, n_img = int(where[0]), int(where.numel())
    v_t, t_t = x[v_start : v_start + n_img], x[v_start + n_img :]
    m_v_t = (v_t @ t_t.T).softmax(dim=1).mean(0)
    t_token_idx = (m_v_t > m_v_t.mean()).nonzero().squeeze(1)  # relative to the text start
    ident = torch.arange(ids.shape[0])  # original position of each current token (merged: its centre's)
    v_num, h, stages = n_img, x, []
    for layer_idx, layer in enumerate(lm.layers):
        pos = torch.arange(len(ident)) if positions == "reindex" else ident
        h, a = layer_forward(model, layer, h, pos)
        if layer_idx not in layers:
            continue
        stage = list(layers).index(layer_idx)
        text_start = v_start + v_num
        attn = a["p"].mean(0)  # mean over heads [n, n]
        relation = attn[t_token_idx + text_start][:, v_start:text_start].mean(0)  # [v_num]
        k = min(tokens[stage], v_num - 1)
        keep = torch.zeros(v_num, dtype=torch.bool)
        keep[relation.topk(k).indices] = True
        vis_h, vis_id = h[v_start:text_start], ident[v_start:text_start]
        new_h, new_id, merged_at = vis_h[keep], vis_id[keep], {}
        pruned = (~keep).nonzero().squeeze(1)
        if recycle and pruned.numel() > 0:
            n_sel = int(pruned.numel() * 0.3) + 1
            chosen = relation[pruned].topk(n_sel).indices
            cluster_num = int(n_sel / 10) + 1
            merged, centres = cluster_and_merge_official(vis_h[pruned[chosen]], cluster_num)
            centre_id = vis_id[pruned[chosen[centres]]]
            new_h, new_id = torch.cat([new_h, merged]), torch.cat([new_id, centre_id])
            merged_at = dict(zip(centre_id.tolist(), merged))
        if positions == "original":
            order = new_id.argsort()
            new_h, new_id = new_h[order], new_id[order]
        h = torch.cat([h[:v_start], new_h, h[text_start:]])
        ident = torch.cat([ident[:v_start], new_id, ident[text_start:]])
        v_num = new_id.numel()
        stages.append({"kept": sorted(new_id.tolist()), "merged": merged_at})
    return stages
