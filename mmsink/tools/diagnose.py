"""Diagnostics behind ``mmsink inspect`` and ``mmsink calibrate``: what the model's attention sinks look
like, layer by layer, for one input (full attention rows of one sample are formed here: a diagnostic,
not the serving path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sinks.var import sink_scores


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@torch.no_grad()
def collect_batch(model, inputs, family, first_only: bool = False, tower=None) -> dict:
    """One forward of the (unwrapped or disabled) model: the hidden states entering each layer
    [B, n, D], every head's attention probabilities [B, H, n, n] recomputed from them (of sample 0
    alone with ``first_only``; padding is not masked, so several samples need prompts of one length),
    the projector's input and, given ``tower`` (the vision module), its hidden states."""
    captured, grabbed, hooks = {}, {}, []
    for i, layer in enumerate(family.layers):

        def grab(module, args, kwargs, i=i):
            captured[i] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

        hooks.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
    hooks.append(family.projector.register_forward_pre_hook(lambda m, a: grabbed.setdefault("vit", a[0])))
    if tower is not None:  # the hook returns None: the tower's output stays as it is
        hooks.append(tower.register_forward_hook(lambda m, a, out: grabbed.update(tower=out.hidden_states)))
    try:
        model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    rows = slice(0, 1) if first_only else slice(None)
    probs = []
    for i, layer in enumerate(family.layers):
        h, (cos, sin) = captured[i]
        attn = layer.self_attn
        x = layer.input_layernorm(h[rows])
        b, n, hd = x.shape[0], x.shape[1], attn.head_dim
        q = attn.q_proj(x).view(b, n, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, -1, hd).transpose(1, 2)
        q = q * cos[rows, None] + rotate_half(q) * sin[rows, None]
        k = k * cos[rows, None] + rotate_half(k) * sin[rows, None]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        s = (q @ k.transpose(-1, -2)).float() * attn.scaling
        causal = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
        probs.append(torch.softmax(s.masked_fill(~causal, float("-inf")), -1))  # [B, H, n, n]
    hidden = [captured[i][0] for i in range(len(family.layers))]
    return {"hidden": hidden, "probs": probs, "vit": grabbed.get("vit"), "tower": grabbed.get("tower")}


def collect(model, inputs, family) -> dict:
    """``collect_batch`` for sample 0: per-layer hidden states entering each layer, attention
    probabilities of every head [H, n, n], and the vision features' norms."""
    d = collect_batch(model, inputs, family, first_only=True)
    norms = d["vit"].float().norm(dim=-1) if d["vit"] is not None else None
    return {"hidden": [h[0] for h in d["hidden"]], "probs": [p[0] for p in d["probs"]], "vit_norms": norms}


def massive_dims(hidden, abs_threshold=100.0, ratio=1000.0) -> dict:
    """Massive activations (Sun et al.): |h| > abs_threshold and > ratio x the token's median |h|.
    Returns {layer: [(token, dim, value)]}."""
    out = {}
    for layer, h in enumerate(hidden):
        a = h.float().abs()
        med = a.median(dim=-1, keepdim=True).values
        hit = (a > abs_threshold) & (a > ratio * med)
        idx = hit.nonzero().tolist()
        if idx:
            out[layer] = [(t, d, round(float(h[t, d]), 2)) for t, d in idx]
    return out


def top_outlier_dims(hidden, k: int = 2, layers=None) -> list[int]:
    """Channels that most often carry a token's largest |h| / RMS: the model's sink dimensions when no
    activation passes the absolute rule (small models)."""
    counts = None
    for layer, h in enumerate(hidden):
        if layers is not None and layer not in layers:
            continue
        x = h.float()
        r = x.abs() / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        peak = r.max(-1)
        strong = peak.values > 5  # only tokens with a real outlier
        c = torch.bincount(peak.indices[strong], minlength=x.shape[-1]).float()
        counts = c if counts is None else counts + c
    if counts is None or counts.sum() == 0:
        return []
    return counts.topk(k).indices.tolist()


def layer_report(data, is_image, anchor: int, sink_dims, tau: float = 20.0, rho: float = 0.5) -> list[dict]:
    """Per layer: sink tokens, sink rate of heads, text->image mass, image-centric heads at the anchor,
    VisiPruner's contribution test (min cos(o - c_j, o) over image tokens) and max ||c_j||."""
    rows = []
    n = is_image.shape[0]
    after = (~is_image) & (is_image.cumsum(0) > 0)
    for layer, (h, p) in enumerate(zip(data["hidden"], data["probs"])):
        row = {"layer": layer}
        if sink_dims:
            phi = sink_scores(h[None], sink_dims)[0]
            sinks = phi > tau
            row["sink_tokens"] = sinks.nonzero().flatten().tolist()
            vis_sink = sinks & is_image
            img_mass = p[:, anchor][:, is_image].sum(-1)
            non = p[:, anchor][:, is_image & ~sinks].sum(-1)
            centric = (img_mass >= 0.2) & (non >= rho * img_mass) & bool(vis_sink.any())
            row["image_centric_heads"] = centric.nonzero().flatten().tolist()
        row["sink_rate"] = float((p[:, :, 0].mean(-1) > 0.3).float().mean())  # Gu et al.: mass on token 0
        if after.any():
            row["text_to_image_mass"] = float(p[:, after][:, :, is_image].sum(-1).mean())
        row["anchor_image_mass"] = float(p[:, anchor, is_image].sum(-1).mean())
        row["n_tokens"] = n
        rows.append(row)
    return rows


def contribution_curve(model, data, family, is_image, anchor: int) -> list[dict]:
    """min over image tokens of cos(o - c_j, o) and max ||c_j|| for the anchor row at every layer."""
    out = []
    for layer, (h, p) in enumerate(zip(data["hidden"], data["probs"])):
        blk = family.layers[layer]
        x = blk.input_layernorm(h[None])
        hd = blk.self_attn.head_dim
        v = blk.self_attn.v_proj(x).view(1, x.shape[1], -1, hd).transpose(1, 2)[0]
        v = v.repeat_interleave(p.shape[0] // v.shape[0], 0).float()
        w = p[:, anchor]  # [H, n]
        c = (w[..., None] * v).permute(1, 0, 2).reshape(w.shape[1], -1)
        o = c.sum(0)
        cos = F.cosine_similarity(o[None] - c, o[None].expand_as(c), dim=-1)
        out.append(
            {
                "layer": layer,
                "min_cos": float(cos[is_image].min()) if is_image.any() else None,
                "max_contribution": float(c[is_image].norm(dim=-1).max()) if is_image.any() else None,
            }
        )
    return out
