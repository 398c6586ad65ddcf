"""Plain ports of each peer's OFFICIAL selection rule, written from the logic of its official repository
(read, not copied), for the tiny transformers models of ``tiny.py``: batch 1, no padding, one image, eager,
every layer computed by hand on the kept tokens (``reference.layer_forward``). Each returns what the
official code keeps, as original sequence positions (or tower token indices for VisionZip).

- PDrop: Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py`` (``pdrop_forward``,
  ``pdrop_rank_drop``) and ``llava/model/llava_arch.py`` (``image_token_posi``, ``prompt_len``).
- DART: ZichenWen1/DART, ``llava/model/language_model/modeling_llama_self.py`` (``DART.forward``,
  ``DART.get_retained_image_token``), ``llava/eval/model_vqa_loader.py`` (defaults).
- VisionZip: dvlab-research/VisionZip, ``visionzip/clip_encoder.py`` (``CLIPVisionTower_VisionZip``),
  ``visionzip/utils.py`` (the layer's keys averaged over heads), ``visionzip/main.py`` (dominant - 1).
- VisiPruner: EIT-NLP/VisiPruner, ``llava/model/language_model/custom_modeling_llama.py``
  (``LlamaAttention.forward``: the shallow-layer edits, 7B and 13B layer-0 rules).

Where an official code cannot run a case (grouped-query attention in PDrop's scoring matmul), the port does
what the layer itself does (keys shared by their group's heads); said at the function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from reference import embed, layer_forward, rotate_half


def image_span(ids, image_token_id):
    where = (ids == image_token_id).nonzero().squeeze(1)
    return int(where[0]), int(where.numel())


# --------------------------------------------------------------------------------------------- PDrop


def pdrop_official(model, ids, pixel_values, layer_list, ratio, positions="reindex"):
    """PyramidDrop's kept image positions after each stage: a list (one per entry of ``layer_list``) of
    sorted original positions. ``ratio``: lambda, the official ``image_token_ratio_list`` being
    [lambda, lambda**2, lambda**3] (with 1.0 put in front). ``positions``: "reindex" as the official code
    (position ids 0..n-1 after each drop), "original" as mmsink (every token keeps its position).

    At ``rank_layer = layer_idx + 1`` in ``layer_list``, after layer ``layer_idx`` ran: the states are
    put through ``layers[rank_layer]``'s input_layernorm, q/k projections and RoPE at the current
    position ids; the last prompt token's row, causal softmax, mean over heads, the image's current span
    [image_index, image_index + int(N * r[s])); topk int(N * r[s + 1]) of it, sorted."""
    lm = model.model.language_model
    ratio_list = [1.0] + [ratio**s for s in (1, 2, 3)]
    x = embed(model, ids[None], pixel_values)[0]
    image_index, n_img = image_span(ids, model.config.image_token_id)
    keep = torch.arange(ids.shape[0])
    h = x
    stages = []
    for layer_idx, layer in enumerate(lm.layers):
        pos = torch.arange(len(keep)) if positions == "reindex" else keep
        h = layer_forward(model, layer, h, pos)[0]
        rank_layer = layer_idx + 1
        if rank_layer not in layer_list:
            continue
        stage = list(layer_list).index(rank_layer)
        cur = int(n_img * ratio_list[stage])
        keep_len = int(n_img * ratio_list[stage + 1])
        blk = lm.layers[rank_layer]
        attn = blk.self_attn
        hd = attn.head_dim
        xs = blk.input_layernorm(h)
        n = xs.shape[0]
        q = attn.q_proj(xs).view(n, -1, hd).transpose(0, 1)
        k = attn.k_proj(xs).view(n, -1, hd).transpose(0, 1)
        pos = torch.arange(len(keep)) if positions == "reindex" else keep
        cos, sin = lm.rotary_emb(h[None], pos[None])
        q = q * cos[0] + rotate_half(q) * sin[0]
        k = k * cos[0] + rotate_half(k) * sin[0]
        k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)  # GQA: not in the official (Llama-2) code
        last = n - 1  # prompt_len + current image tokens - 1: the last input token in prefill
        w = (q[:, last : last + 1] @ k.transpose(1, 2)) / math.sqrt(hd)  # [H, 1, n]
        causal = torch.arange(n)[None, None] <= last
        w = torch.softmax(w.masked_fill(~causal, float("-inf")).float(), -1)
        score = w.mean(0)[:, image_index : image_index + cur].mean(0)
        top = score.topk(keep_len).indices + image_index
        top = top.sort().values
        sel = torch.cat([torch.arange(image_index), top, torch.arange(image_index + cur, n)])
        h, keep = h[sel], keep[sel]
        stages.append(keep[image_index : image_index + keep_len].tolist())
    return stages


# ---------------------------------------------------------------------------------------------- DART


def dart_official(
    model,
    ids,
    pixel_values,
    max_num_trunction=128,
    K=2,
    image_pivots=4,
    text_pivots=4,
    next_cap=False,
    reduction_ratio=None,
):
    """DART's kept image positions (sorted). Layers 0..K-1 run on every token; before layer K:
    ``last_layer_state`` = model.norm(layer K-1's output); the key states layer K-1 returned (post-RoPE,
    heads repeated as the eager attention returns them) flattened per token; pivots = top
    ``image_pivots`` image tokens and top ``text_pivots`` tokens after the image by L1 norm;
    ``TOKEN_TOPK = math.ceil(max_num_trunction // (image_pivots + text_pivots))`` (LLaVA-NeXT,
    ``next_cap``: ``int(min(B, N - image_pivots) // ...)``; Qwen2-VL, ``max_num_trunction=None``:
    ``int(N * (1 - reduction_ratio) / 8)``); for each pivot in ``list(set(...))`` order,
    the TOKEN_TOPK remaining image tokens with the lowest cosine similarity to it; text pivots removed."""
    lm = model.model.language_model
    x = embed(model, ids[None], pixel_values)[0]
    start, length = image_span(ids, model.config.image_token_id)
    pos = torch.arange(ids.shape[0])
    h = x
    for layer in lm.layers[:K]:
        h, a = layer_forward(model, layer, h, pos)
    last_layer_state = lm.norm(h)
    nh = model.config.text_config.num_attention_heads
    k = a["k"].repeat_interleave(nh // a["k"].shape[0], 0)  # [H, n, d] as the eager attention returns
    any_states = k.permute(1, 0, 2).reshape(k.shape[1], -1)
    if next_cap:
        b = min(max_num_trunction, length - image_pivots)
        token_topk = int(b // (image_pivots + text_pivots))
    elif max_num_trunction is None:  # the Qwen2-VL code (and LLaVA's without max_num_trunction)
        token_topk = int(length * (1 - reduction_ratio) / (image_pivots + text_pivots))
    else:
        token_topk = math.ceil(max_num_trunction // (image_pivots + text_pivots))
    k_img = any_states[start : start + length]
    k_txt = any_states[start + length :]
    image_indices = (torch.norm(k_img, p=1, dim=-1).topk(image_pivots).indices + start).tolist()
    query_indices = (torch.norm(k_txt, p=1, dim=-1).topk(text_pivots).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid)
    for item in list(indices_set):
        sim = -F.cosine_similarity(last_layer_state[item], last_layer_state[valid_list], dim=-1)
        picked = [valid_list[i] for i in sim.topk(token_topk).indices.tolist()]
        indices_set.update(picked)
        valid.difference_update(picked)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


# ----------------------------------------------------------------------------------------- VisionZip


def visionzip_official(model, pixel_values, dominant, contextual):
    """VisionZip on LLaVA-1.5 (``visionzip(model, dominant, contextual)``; the tower keeps ``dominant - 1``
    patches beside [CLS]). Per image: (kept tower indices, [CLS] = 0 first then the dominant patches in
    index order, then the contextual targets in order; features [dominant + contextual, F] in the order
    the LLM receives them). From the feature layer (``layers[-2]``): [CLS]'s attention row summed over
    heads ranks the patches; the rest are compared by their keys averaged over heads (k_proj output, not
    scaled), normalised; every ``max(1, n_rest // contextual)``-th rest token is a target (the first
    ``contextual``); the others join their most similar target; a contextual token is
    ``target + mean(assigned)`` (the target alone when nothing is assigned)."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    layers = getattr(tower, "vision_model", tower).encoder.layers
    blk = layers[-2]
    hs_in = out.hidden_states[-3]  # the input of layers[-2]
    hidden = out.hidden_states[-2]  # its output: the features LLaVA reads
    x = blk.layer_norm1(hs_in)
    sa = blk.self_attn
    b, t, _ = x.shape
    heads = sa.num_heads
    q = (sa.q_proj(x) * sa.scale).view(b, t, heads, -1).transpose(1, 2)
    k = sa.k_proj(x).view(b, t, heads, -1).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2), -1)  # [b, H, t, t]
    metric = k.mean(1)  # [b, t, d]
    dominant_num = dominant - 1
    results = []
    for i in range(b):
        cls_sum = attn[i, :, 0, 1:].sum(0)
        top = cls_sum.topk(dominant_num).indices + 1
        keep_dom = torch.cat([torch.zeros(1, dtype=torch.long), top]).sort().values
        mask = torch.ones(t, dtype=torch.bool)
        mask[keep_dom] = False
        rest = mask.nonzero().squeeze(1)  # tower indices of the filtered tokens, in order
        m = metric[i, rest]
        m = m / m.norm(dim=-1, keepdim=True)
        step = max(1, m.shape[0] // contextual)
        targets = torch.arange(0, m.shape[0], step)[:contextual]
        others = torch.tensor(
            [j for j in range(m.shape[0]) if j not in set(targets.tolist())], dtype=torch.long
        )
        sim = m[others] @ m[targets].T
        assign = sim.argmax(1)
        feats = []
        for c in range(len(targets)):
            members = others[assign == c]
            agg = hidden[i, rest[members]].sum(0) / max(1, len(members))
            feats.append(hidden[i, rest[targets[c]]] + agg)
        kept = keep_dom.tolist() + rest[targets].tolist()
        results.append((kept, torch.cat([hidden[i, keep_dom], torch.stack(feats)], 0)))
    return results


# ---------------------------------------------------------------------------------------- VisiPruner


def visipruner_shallow_official(layer_idx, p, start, end, shallow_mid_layer, model_size):
    """The official shallow-stage edit of one layer's post-softmax attention ``p`` [H, n, n] (prefill,
    one image at [start, end)), no renormalisation. Layer 0, 7B: every row from the image on loses the
    image keys, and the text rows after the image get that mass on the image's first token. Layer 0, 13B:
    the image rows lose the image keys; the text rows after the image lose the first half of the image
    (``vis_half_index = start + int(n_image / 2)``). Layers 1..S-1: the text rows after the image lose the
    image keys."""
    if layer_idx >= shallow_mid_layer:
        return p
    p = p.clone()
    half = start + int((end - start) / 2)
    if layer_idx == 0 and model_size == "7b":
        mass = p[:, end:, start:end].sum(-1)
        p[:, start:, start:end] = 0
        p[:, end:, start] = mass
    elif layer_idx == 0 and model_size == "13b":
        p[:, start:end, start:end] = 0
        p[:, end:, start:half] = 0
    else:
        p[:, end:, start:end] = 0
    return p


def visipruner_shallow_logits(model, ids, pixel_values, shallow_mid_layer, model_size):
    """The last token's logits with only VisiPruner's shallow stage (no token dropped)."""
    lm = model.model.language_model
    h = embed(model, ids[None], pixel_values)[0]
    start, length = image_span(ids, model.config.image_token_id)
    pos = torch.arange(ids.shape[0])
    for li, layer in enumerate(lm.layers):

        def edit(p, li=li):
            return visipruner_shallow_official(li, p, start, start + length, shallow_mid_layer, model_size)

        h = layer_forward(model, layer, h, pos, edit)[0]
    return model.lm_head(lm.norm(h)[-1])
