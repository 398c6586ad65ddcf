"""A plain eager reference of pruned LLaVA prefill, written from the method specs (batch 1).

Every layer is computed by hand on an explicit list of kept sequence positions: projections, rotary
embedding at the ORIGINAL positions, the full post-softmax attention matrix, the published edits, the
MLP. Selection rules read that matrix directly. Nothing here shares code with mmsink.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def embed(model, ids, pixel_values, image_sizes=None):
    lm = model.model
    x = lm.get_input_embeddings()(ids)
    if pixel_values is not None:
        extra = {} if image_sizes is None else {"image_sizes": image_sizes}
        feats = lm.get_image_features(pixel_values=pixel_values, return_dict=True, **extra).pooler_output
        feats = torch.cat(list(feats), 0)
        img = ids == model.config.image_token_id
        x = x.clone()
        x[img] = feats.to(x.dtype)
    return x


def layer_forward(model, layer, h, pos, edit=None):
    """h [n, d] hidden of kept tokens (sorted by position), pos [n] original positions."""
    attn = layer.self_attn
    n = h.shape[0]
    nh = model.config.text_config.num_attention_heads
    hd = attn.head_dim
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(n, -1, hd).transpose(0, 1)
    k = attn.k_proj(x).view(n, -1, hd).transpose(0, 1)
    v = attn.v_proj(x).view(n, -1, hd).transpose(0, 1)
    cos, sin = model.model.language_model.rotary_emb(h[None], pos[None])
    cos, sin = cos[0], sin[0]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k_heads = k
    rep = nh // k.shape[0]
    k = k.repeat_interleave(rep, 0)
    v = v.repeat_interleave(rep, 0)
    s = (q @ k.transpose(1, 2)) / math.sqrt(hd)
    causal = pos[None, :] <= pos[:, None]
    s = s.masked_fill(~causal, float("-inf"))
    p = torch.softmax(s.float(), -1)
    if edit is not None:
        p = edit(p)
    o = p.to(v.dtype) @ v  # [H, n, hd]
    out = attn.o_proj(o.transpose(0, 1).reshape(n, -1))
    h = h + out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, {"p": p, "v": v, "k": k_heads, "o": o}


def run(model, ids, pixel_values, method=None, var=None, prompt_len=None, image_sizes=None, **opt):
    """Returns (last-token logits, kept positions per layer). ids: [L] one sample, no padding.
    ``var``: dict(sink_dims, tau, rho, p, layers) applies VAR; tokens from ``prompt_len`` on are treated
    as generated (never sinks)."""
    ids = ids.clone()
    L = ids.shape[0]
    img_id = model.config.image_token_id
    is_img = ids == img_id
    x = embed(model, ids[None], pixel_values, image_sizes)[0]
    keep = torch.arange(L)
    layers = model.model.language_model.layers
    nl = len(layers)
    state = {"fused": -1, "quiet": 0, "done": False}
    if method in ("random", "pool"):
        x, keep = pre_llm(method, x, is_img, **opt)
    if method == "visionzip":
        x, keep = visionzip_embed(model, ids, pixel_values, opt["budget"])
    kept_per_layer = []
    h = x[keep]
    for l, layer in enumerate(layers):
        kept_per_layer.append(keep[is_img[keep]].tolist())
        edit = shallow_edit(l, keep, is_img, L, opt) if method == "visipruner" else None
        if var is not None and edit is None and l in var["layers"]:
            edit = var_edit(h, keep, is_img, prompt_len or L, var)
        h, a = layer_forward(model, layer, h, keep, edit)
        anchor = int((keep == (prompt_len or L) - 1).nonzero()[0, 0])  # the prompt's last token
        new = decide(method, l, nl, keep, is_img, h, a, state, dict(opt, anchor=anchor, model=model))
        if new is not None:
            sel = torch.isin(keep, new)
            h, keep = h[sel], keep[sel]
    h = model.model.language_model.norm(h)
    return model.lm_head(h[-1]), kept_per_layer


def pre_llm(method, x, is_img, budget, seed=0, **_):
    where = is_img.nonzero().squeeze(1)
    n = where.numel()
    k = budget if isinstance(budget, int) else math.ceil(budget * n)
    text = (~is_img).nonzero().squeeze(1)
    if method == "random":
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
        chosen = where[pick]
    else:
        side = int(math.isqrt(n))
        g = max(1, round(math.sqrt(k)))
        grid = x[where].T.reshape(1, -1, side, side)
        pooled = F.adaptive_avg_pool2d(grid, (g, g))[0].flatten(1).T
        centre = [int((i + 0.5) * side / g) for i in range(g)]
        chosen = torch.tensor([where[r * side + c] for r in centre for c in centre])
        x = x.clone()
        x[chosen] = pooled
    keep = torch.cat([text, chosen]).sort().values
    return x, keep


def last_row_scores(a, keep, is_img, anchor=-1):
    row = a["p"][:, anchor, :].mean(0)  # the prompt's last token, mean over heads
    return row, is_img[keep]


def topk_positions(scores, keep, cand, k):
    s = scores.masked_fill(~cand, float("-inf"))
    k = min(k, int(cand.sum()))
    return keep[s.topk(k).indices]


def decide(method, l, nl, keep, is_img, h, a, state, opt):
    text = keep[~is_img[keep]]
    if method in ("fastv", "pdrop"):
        if method == "fastv":
            if l != opt.get("k", 2) - 1:
                return None
            n_img = int(is_img.sum())
            b = opt["budget"]
            k = b if isinstance(b, int) else math.ceil(b * n_img)
            row, cand = last_row_scores(a, keep, is_img, opt.get("anchor", -1))
        else:  # PDrop: the next layer's own norm + q/k + RoPE (original positions); int(N * ratio**stage)
            if l + 1 not in opt["layers"]:
                return None
            stage = list(opt["layers"]).index(l + 1) + 1
            k = int(int(is_img.sum()) * opt["ratio"] ** stage)
            row = next_layer_row(opt["model"], l + 1, h, keep, opt.get("anchor", -1))
            cand = is_img[keep]
        return torch.cat([text, topk_positions(row, keep, cand, k)])
    if method == "dart":
        if l != opt.get("k", 2) - 1:
            return None
        return torch.cat([text, dart_keep(opt["model"], keep, is_img, h, a["k"], opt)])
    if method == "visipruner":
        return visipruner_decide(l, nl, keep, is_img, a, state, opt)
    return None


def next_layer_row(model, layer, h, keep, anchor):
    """PDrop's score: the anchor row's softmax at ``layer`` from its own input_layernorm, q/k and RoPE on
    the states entering it, mean over heads."""
    blk = model.model.language_model.layers[layer]
    attn, hd = blk.self_attn, blk.self_attn.head_dim
    x = blk.input_layernorm(h)
    n = x.shape[0]
    q = attn.q_proj(x).view(n, -1, hd).transpose(0, 1)
    k = attn.k_proj(x).view(n, -1, hd).transpose(0, 1)
    cos, sin = model.model.language_model.rotary_emb(h[None], keep[None])
    q = q * cos[0] + rotate_half(q) * sin[0]
    k = k * cos[0] + rotate_half(k) * sin[0]
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    s = torch.einsum("hd,hnd->hn", q[:, anchor], k).float() / math.sqrt(hd)
    s = s.masked_fill(keep[None] > keep[anchor], float("-inf"))
    return torch.softmax(s, -1).mean(0)


def dart_keep(model, keep, is_img, h, k_heads, opt):
    """DART's kept image positions (one image): pivots by the L1 norm of the post-RoPE keys, cosine on the
    final norm of the layer's output, each pivot in the order Python's set lists them takes
    min(B, N - pivots) // (image + text pivots) of the least similar remaining image tokens."""
    ip, tp = opt.get("image_pivots", 4), opt.get("text_pivots", 4)
    cand = is_img[keep]
    n = int(cand.sum())
    b = opt["budget"] if isinstance(opt["budget"], int) else math.ceil(opt["budget"] * n)
    per = min(b, n - ip) // (ip + tp)
    norm1 = k_heads.float().abs().sum((0, 2))
    state = F.normalize(model.model.language_model.norm(h).float(), dim=-1)
    first = int(cand.nonzero()[0])
    after = ~cand & (torch.arange(len(keep)) > first)
    img_piv = topk_positions(norm1, torch.arange(len(keep)), cand, ip).tolist()
    txt_piv = topk_positions(norm1, torch.arange(len(keep)), after, tp).tolist()
    pool = set(cand.nonzero().squeeze(1).tolist()) - set(img_piv)
    taken = set(img_piv)
    for p in list(set(img_piv + txt_piv)):  # slots = positions here (batch 1, nothing dropped before)
        rest = sorted(pool)
        sim = state[rest] @ state[p]
        pick = [rest[i] for i in (-sim).topk(per).indices.tolist()]
        taken |= set(pick)
        pool -= set(pick)
    return keep[sorted(taken)]


def contributions(a, anchor=-1):
    p, v = a["p"], a["v"]  # [H, n, n], [H, n, hd]
    w = p[:, anchor, :]  # [H, n]
    c = (w[..., None] * v.float()).permute(1, 0, 2).reshape(w.shape[1], -1)  # [n, H*hd]
    o = c.sum(0)
    cos = F.cosine_similarity(o[None] - c, o[None].expand_as(c), dim=-1)
    return cos, c.norm(dim=-1)


def visipruner_decide(l, nl, keep, is_img, a, state, opt):
    S = opt.get("S", max(1, round(6 * nl / 32)))
    if l < S + 1:
        return None
    cand = is_img[keep]
    if not bool(cand.any()):
        return None
    text = keep[~cand]
    cos, cn = contributions(a, opt.get("anchor", -1))
    budget = opt.get("budget")
    fallback = opt.get("fallback", nl // 2 if budget is not None else None)
    if state["fused"] < 0:
        fuse = bool((cos[cand] < opt.get("layer_threshold", 0.995)).any())
        if fallback is not None and l >= fallback:
            fuse = True
        if not fuse:
            return None
        state["fused"] = l
        if budget is None:
            chosen = keep[cand & (cn > opt.get("tokens_threshold", 0.2))]
        else:
            chosen = topk_positions(cn, keep, cand, budget)
        return torch.cat([text, chosen])
    deep = opt.get("deep", budget is None)
    if deep and not state["done"]:
        if not bool((cos[cand] < opt.get("deep_threshold", 0.999)).any()):
            state["quiet"] += 1
        if state["quiet"] >= opt.get("deep_passes", 2):
            state["done"] = True
            return text
    return None


def shallow_edit(l, keep, is_img, L, opt):
    S = opt.get("S", None)
    nl = opt["num_layers"]
    S = max(1, round(6 * nl / 32)) if S is None else S
    if l >= S:
        return None
    img_k = is_img[keep]
    rows_img = img_k.clone()
    rows_txt = ~img_k
    rule0 = opt.get("first_layer_rule", True)
    rule0 = ("13b" if nl == 40 else "7b") if rule0 is True else rule0

    def edit(p):
        p = p.clone()
        if l == 0 and rule0 == "13b":  # image rows lose the image keys, text rows the first half
            half = img_k & (img_k.cumsum(0) <= int(img_k.sum()) // 2)
            sub = p[:, rows_img]
            sub[:, :, img_k] = 0
            p[:, rows_img] = sub
            sub = p[:, rows_txt]
            sub[:, :, half] = 0
            p[:, rows_txt] = sub
        elif l == 0 and rule0 == "7b":
            first = int(img_k.nonzero()[0])
            mass = p[:, rows_txt][:, :, img_k].sum(-1)  # [H, n_txt]
            sub = p[:, rows_img]
            sub[:, :, img_k] = 0
            p[:, rows_img] = sub
            sub = p[:, rows_txt]
            sub[:, :, img_k] = 0
            sub[:, :, first] = mass
            p[:, rows_txt] = sub
        else:
            sub = p[:, rows_txt]
            sub[:, :, img_k] = 0
            p[:, rows_txt] = sub
        return p

    return edit


def var_edit(h, keep, is_img, prompt_len, cfg):
    """VAR as the paper states it, on the full post-softmax matrix of one layer."""
    x = h.float()
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    phi = (x[:, list(cfg["sink_dims"])].abs() / rms).amax(-1)
    sink = (phi > cfg["tau"]) & (keep < prompt_len)
    img_k = is_img[keep]
    vis_non = img_k & ~sink
    rows = (~img_k & (img_k.cumsum(0) > 0)).nonzero().squeeze(1).tolist()
    rho, p_, mass = cfg["rho"], cfg["p"], cfg.get("image_mass", 0.2)

    def edit(p):
        if not bool((img_k & sink).any()):
            return p
        p = p.clone()
        for i in rows:
            a = p[:, i, :]
            img = a[:, img_k].sum(-1)
            non = a[:, vis_non].sum(-1)
            chosen = (img >= mass) & (non >= rho * img) & (non > 0)
            omega = p_ * a[:, sink].sum(-1)
            new = a.clone()
            new[:, sink] = a[:, sink] * (1 - p_)
            new[:, vis_non] = a[:, vis_non] + omega[:, None] * a[:, vis_non] / non.clamp(min=1e-30)[:, None]
            p[:, i, :] = torch.where(chosen[:, None], new, a)
        return p

    return edit


def visionzip_embed(model, ids, pixel_values, budget):
    """VisionZip as the official code (dvlab-research/VisionZip) selects and merges, from the tower's own
    attention weights (eager, materialised): [CLS] + the top ``dominant - 1`` patches by the [CLS] row of the
    feature layer's attention (summed over heads); every ``max(1, n_rest // contextual)``-th remaining patch
    is a target, the others join their most key-similar target, a contextual token is ``target +
    mean(joined)``. mmsink keeps original positions: [CLS] goes to the first patch slot not kept."""
    lm = model.model
    tower = lm.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    layers = getattr(tower, "vision_model", tower).encoder.layers
    layer = len(layers) - 2  # the layer whose output is hidden_states[-2]
    blk = layers[layer]
    x_in = blk.layer_norm1(out.hidden_states[layer])
    keys = blk.self_attn.k_proj(x_in)
    heads = blk.self_attn.num_heads
    qh = blk.self_attn.q_proj(x_in).view(*x_in.shape[:2], heads, -1).transpose(1, 2)
    kh = keys.view(*x_in.shape[:2], heads, -1).transpose(1, 2)
    attn = torch.softmax(qh @ kh.transpose(-1, -2) * blk.self_attn.scale, -1)  # [I, H, 1+P, 1+P]
    score = attn[:, :, 0, 1:].sum(1)
    metric = F.normalize(keys.view(*keys.shape[:2], heads, -1).mean(2)[:, 1:], dim=-1)
    feats = out.hidden_states[-2][:, 1:]
    cls_feats = out.hidden_states[-2][:, 0]
    p = feats.shape[1]
    total = budget if isinstance(budget, int) else math.ceil(budget * p)
    contextual = min(round(total * 10 / 64), total - 1)
    dominant = total - contextual  # [CLS] is one of them
    new_feats, keeps = feats.clone(), []
    for i in range(feats.shape[0]):
        dom = score[i].topk(dominant - 1).indices if dominant > 1 else torch.zeros(0, dtype=torch.long)
        rest = [j for j in range(p) if j not in set(dom.tolist())]
        targets = []
        if contextual:
            step = max(1, len(rest) // contextual)
            targets = rest[::step][:contextual]
            others = [j for j in rest if j not in set(targets)]
            sim = metric[i, others] @ metric[i, targets].T
            assign = sim.argmax(1).tolist()
            for t_i, t in enumerate(targets):
                group = [o for o, a in zip(others, assign) if a == t_i]
                joined = feats[i, group].sum(0) / max(1, len(group))
                new_feats[i, t] = feats[i, t] + joined
        kept = set(dom.tolist()) | set(targets)
        slot = min(j for j in range(p) if j not in kept)  # [CLS]'s slot
        new_feats[i, slot] = cls_feats[i]
        keeps.append(sorted(kept | {slot}))
    proj = lm.multi_modal_projector(new_feats)
    x = lm.get_input_embeddings()(ids[None])[0].clone()
    where = (ids == model.config.image_token_id).nonzero().squeeze(1)
    x[where] = proj.reshape(-1, proj.shape[-1])
    chosen = torch.cat([where[i * p + torch.tensor(k)] for i, k in enumerate(keeps)])
    text = (ids != model.config.image_token_id).nonzero().squeeze(1)
    return x, torch.cat([text, chosen]).sort().values
