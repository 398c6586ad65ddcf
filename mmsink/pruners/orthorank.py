"""OrthoRank as a visual-token pruner (after Shin, Oh, Oh, "Token Selection via Sink Token Orthogonality
for Efficient LLM Inference", ICML 2025).

The paper's observation: with depth, the normalised hidden states of the tokens turn towards the sink
token's, whose own state barely changes; a token still orthogonal to the sink is one the layer has work
to do on. Its importance score, at the states entering layer K:

    s_i = 1 - |cos(x_i, x_sink)|,   x = layers[K].input_layernorm(h)  (the state the layer itself reads)

The sink is each sample's first real token (the start / system token that carries the attention sink in
LLaVA-1.5, LLaVA-NeXT and Qwen2-VL; left padding is skipped); ``sink="max_norm"`` takes instead the real
token of largest ||h|| entering layer K (for models whose sink sits on a later token, e.g. a delimiter).
Each image keeps its ``budget`` visual tokens of highest score (ties: the earlier token), text tokens are
never dropped, and layers K.. run on the kept tokens; the one decision is taken after layer K-1, as FastV's.

Two forms. ``form="visual"`` (default): the one-shot form above on the visual tokens, so that it sits
beside the other pruners (same plan, same budgets, same FLOPs accounting). Budget: visual tokens kept per
image from layer K on (int), or a fraction of each image's tokens (ceil).

``form="layers"``: the paper's own. In every layer from K on, each prompt's tokens (any kind) are scored
on the states entering that layer; the prompt's last token (it predicts the next one; our choice) and
the ``ceil(budget * P) - 1`` best others of its P real tokens are updated by the layer, the others skip
it with their state unchanged and still give the layer's keys and values (computed from their input
state, as the plain layer would), and are scored again by the next layer. Tokens after the prompt
(generated ones, when ``generate`` runs without a cache) are always updated, so a cached decode gives
the same tokens. Budget: the fraction of each prompt's tokens a layer updates (a float). The paper's
method is a text LLM's: it applies to prompts without images too. ViT sinks (``sink_forward``) are updated
by every selection layer, in addition to the budget's tokens. VAR is refused: its reweighting does not
reach a selection layer's own attention. ``wrap(model, orthorank={...})`` is this form.
Stats of a selection layer: ``kept_tokens`` / ``kept_indices`` are the visual tokens it holds as keys and
values (all: none is dropped), ``tokens_per_layer`` the padded slots it updated; ``extra["orthorank"]``
has per layer and sample ``updated`` (tokens updated), ``updated_visual`` (of them, visual), ``held``
(tokens whose keys and values it holds) and ``updated_indices``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
import torch.nn.functional as F

from ..core.attention import repeat_kv
from ..core.flops import linear_params
from ..core.plan import gather_rows, layer_device
from .base import Pruner, budget_count, budget_tokens, register, topk_counts, topk_per_image

FORMS = ("visual", "layers")


@register
class OrthoRank(Pruner):
    name = "orthorank"
    default_budget = 0.5

    @dataclasses.dataclass
    class Options:
        layer: int = 2  # K: tokens are scored on the states entering layer K and dropped from it on
        sink: str = "first"  # or "max_norm"
        form: str = "visual"  # or "layers": the paper's per-layer selection (see the module's text)
        layers: tuple | None = None  # form="layers": the layers that run a selection (default: K to the last)

    def check_options(self):
        if isinstance(self.options.layer, bool) or not isinstance(self.options.layer, int):
            raise ValueError(f"mmsink: orthorank layer must be an int, got {self.options.layer!r}")
        if self.options.layer < 1:
            raise ValueError("mmsink: orthorank needs layer >= 1 (the sink's state forms in the layers)")
        if self.options.sink not in ("first", "max_norm"):
            raise ValueError(
                f"mmsink: orthorank sink must be 'first' or 'max_norm', got {self.options.sink!r}"
            )
        if self.options.form not in FORMS:
            raise ValueError(f"mmsink: orthorank form must be one of {FORMS}, got {self.options.form!r}")
        chosen = self.options.layers
        if chosen is not None and (
            self.options.form != "layers"
            or not isinstance(chosen, (list, tuple))
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in chosen)
        ):
            raise ValueError(
                f"mmsink: orthorank layers must be layer indices >= 1 with form='layers', got {chosen!r}"
            )
        if self.options.form == "layers" and not isinstance(self.budget, float):
            raise ValueError(
                f"mmsink: orthorank form='layers' takes a fractional budget (tokens a layer updates), "
                f"got {self.budget!r}"
            )

    @property
    def plans_text(self) -> bool:
        return self.options.form == "layers"

    def check_with(self, var) -> None:
        if var is not None and self.options.form == "layers":
            raise ValueError(
                "mmsink: orthorank form='layers' does not combine with var (VAR would not reach the "
                "attention of its selection layers)"
            )

    def check_model(self, num_layers):
        if max(self.options.layers or [0]) >= num_layers:
            raise ValueError(
                f"mmsink: orthorank layers {self.options.layers} must be < the model's {num_layers}"
            )
        if self.options.layer >= num_layers:
            raise ValueError(
                f"mmsink: orthorank layer={self.options.layer} must be < the model's {num_layers} layers"
            )

    def final_layer(self, ctx):
        return self.options.layer if self.options.form == "visual" else None

    def report(self, ctx):
        out = {"layer": self.options.layer, "sink": self.options.sink, "form": self.options.form}
        if self.options.form == "layers":  # layer -> per sample: how many real tokens it updated, which
            out["updated"] = ctx.run.get("updated", {})
            out["held"] = ctx.run.get("held", {})
            subs = ctx.run.get("subs", {})
            out["updated_indices"] = {
                layer: [seg.idx[i][seg.valid[i]].tolist() for i in range(seg.idx.shape[0])]
                for layer, seg in subs.items()
            }
            out["updated_visual"] = {layer: ctx.visual(seg).sum(1).tolist() for layer, seg in subs.items()}
        return {"orthorank": out}

    # ---- the paper's per-layer form: select before each layer from K on, attend over every token
    def install(self, seam, family):
        if self.options.form != "layers":
            return []

        def before(layer, module, args, kwargs):
            ctx = seam.prefill()
            chosen = self.options.layers
            if ctx is None or (layer < self.options.layer if chosen is None else layer not in chosen):
                return None  # a plain layer (a carried selection rejoins in the plan)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if ctx.carry is not None:  # the previous layer ran a selection: every token's state first
                hidden = ctx.rejoin(hidden)
            select_layer(ctx, layer, hidden, self.budget, self.options.sink)
            return (hidden, *args[1:]), kwargs

        def before_norm(module, args):
            ctx = seam.prefill()
            if ctx is not None and ctx.carry is not None:  # the last layer ran a selection
                return (ctx.rejoin(args[0]), *args[1:])
            return None

        hooks = [family.lm_parts.norm.register_forward_pre_hook(before_norm)]
        for i, blk in enumerate(family.layers):
            hooks.append(blk.register_forward_pre_hook(partial(before, i), with_kwargs=True))
        return hooks

    def directive(self, ctx, layer):
        if ctx.carry is None:
            return None
        ctx.run.setdefault("subs", {})[layer] = ctx.seg  # the selection this layer updates (for stats)
        return {"reweight": partial(carried_attention, ctx, layer)}

    def after_layer(self, ctx, layer, hidden, observed):
        if self.options.form != "visual" or layer != self.options.layer - 1:
            return
        score = orthogonality(ctx, self.options.layer, hidden, self.options.sink)
        chosen = topk_per_image(ctx, score, lambda orig, cur: budget_count(self.budget, orig), self.budget)
        ctx.decide(ctx.keep_text(chosen), counts=topk_counts(ctx, lambda o, c: budget_tokens(self.budget, o)))


def orthogonality(ctx, layer: int, hidden: torch.Tensor, which: str = "first") -> torch.Tensor:
    """[B, n] 1 - |cos(x_i, x_sink)| on ``layer``'s input norm of ``hidden`` (the current slots); the sink
    is each sample's first real slot, or (``which="max_norm"``) its real slot of largest ||h||."""
    block = ctx.lm.layers[layer]
    dev = layer_device(block)  # where the layer computes (accelerate-offloaded weights sit on meta)
    x = block.input_layernorm(hidden.to(dev)).float()
    b, n, d = x.shape
    valid = ctx.seg.valid.to(dev)
    if which == "max_norm":
        sink = hidden.to(dev).float().norm(dim=-1).masked_fill(~valid, -1.0).argmax(1)
    else:
        sink = valid.float().argmax(1)  # the first real slot (left padding before it)
    xs = x[torch.arange(b, device=dev), sink]  # [B, D]
    dots = torch.einsum("bnd,bd->bn", x, xs)
    ctx.extra_flops += 2 * b * n * d  # the dot products (norms are elementwise work, not counted)
    cos = dots / (x.norm(dim=-1) * xs.norm(dim=-1, keepdim=True)).clamp_min(1e-12)
    return (1 - cos.abs()).to(ctx.device)


def select_layer(ctx, layer: int, hidden: torch.Tensor, ratio: float, which: str) -> None:
    """Choose the tokens ``layer`` updates (``ctx.select``) from the states entering it, per sample: the
    anchor, the ``ceil(ratio * P) - 1`` prompt tokens of highest score, every real token after the anchor,
    and the ViT sinks where ``sink_forward`` protects them. Counts come from host facts (no device read)
    unless tokens are protected."""
    lay, seg = ctx.layout, ctx.seg
    score = orthogonality(ctx, layer, hidden, which)
    slot = torch.arange(seg.n, device=score.device)[None]
    anchor = ctx.anchor_slot()[:, None]
    cand = ctx.in_prompt() & (slot != anchor)
    prompt = [a - (lay.length - n) + 1 for a, n in zip(lay.anchors, lay.lengths)]  # real tokens up to it
    k = [max(1, math.ceil(ratio * p)) - 1 for p in prompt]
    order = score.masked_fill(~cand, float("-inf")).argsort(dim=1, descending=True, stable=True)
    ks = torch.tensor(k, device=score.device)[:, None]
    best = torch.zeros_like(cand).scatter(1, order, slot < ks)
    rows = (best & cand) | (seg.valid & ~ctx.in_prompt()) | (seg.valid & (slot == anchor))
    per = [m + 1 + (n - p) for m, p, n in zip(k, prompt, lay.lengths)]
    if ctx.protected is not None:  # ViT sinks are never left behind; how many join the budget's: one read
        rows = rows | (gather_rows(ctx.protected, seg.idx) & seg.valid).to(rows.device)
        per = rows.sum(1).tolist()
    ctx.select(rows, per)
    count_layer(ctx, layer, per)


def count_layer(ctx, layer: int, per: list) -> None:
    """FLOPs of a layer run on a selection beyond what the plan charges for its rows (``ctx.slots``): the
    selected queries' attention over every key (``attn_flops``), the skipped tokens' key / value
    projections (``add_flops``; the score counts itself). Per sample, its difference from a plain layer
    on its tokens too: that is what the stats charge it (the layer's segment is the whole one)."""
    lay = ctx.layout
    blk = ctx.lm.layers[layer]
    heads, d = blk.self_attn.config.num_attention_heads, blk.self_attn.head_dim
    kv = linear_params(blk.self_attn.k_proj) + linear_params(blk.self_attn.v_proj)
    full = linear_params(blk)
    rest = [max(x - p, 1) for x, p in zip(lay.lengths, per)]  # an empty set still runs one padding row
    ctx.attn_flops[layer] = 4 * lay.batch * heads * max(per) * ctx.seg.n * d
    own = [
        2 * p * full + 4 * heads * p * x * d + 2 * r * kv - (2 * x * full + 4 * heads * x * x * d)
        for p, x, r in zip(per, lay.lengths, rest)
    ]
    ctx.add_flops(2 * lay.batch * max(rest) * kv, own)
    ctx.run.setdefault("updated", {})[layer] = list(per)
    ctx.run.setdefault("held", {})[layer] = list(lay.lengths)  # no token is dropped: all give keys


def carried_attention(ctx, layer: int, q, k, v, mask, scaling, base):
    """The attention of a layer run on a selection: the selected queries ``q`` over the keys of every
    token, the skipped ones' computed here from their input states (the layer's norm, projections and
    rotary, as the plain layer would); the layer's cache gets them all, in slot order."""
    carry, sub = ctx.carry, ctx.seg
    blk = ctx.lm.layers[layer]
    attn = blk.self_attn
    rest = carry.rest
    x = blk.input_layernorm(gather_rows(carry.hidden, rest.gather).to(q.device, q.dtype))
    b, c, _ = x.shape
    d = q.shape[-1]
    kr = attn.k_proj(x).view(b, c, -1, d).transpose(1, 2)
    vr = attn.v_proj(x).view(b, c, -1, d).transpose(1, 2)
    cos, sin = rest.position_embeddings(ctx.position_embeddings)
    kr = ctx.lm.rope(kr, kr, cos.to(q.device), sin.to(q.device))[1]
    n = carry.hidden.shape[1]
    keys = place(k, sub, kr, rest, n)
    values = place(v, sub, vr, rest, n)
    valid = ctx.segments[carry.base].valid.to(q.device)
    qs = sub.gather.to(q.device)[:, :, None]  # [B, m, 1] each query's slot among the keys
    j = torch.arange(n, device=q.device)[None, None]
    allowed = ((j <= qs) & valid[:, None]) | (j == qs)  # a padding query row sees itself (no empty row)
    h = q.shape[1]
    kk, vv = repeat_kv(keys, h // keys.shape[1]), repeat_kv(values, h // values.shape[1])
    if base == "eager":  # plain matmuls (what the FLOP counter sees), as transformers' eager attention
        w = torch.matmul(q, kk.transpose(2, 3)) * scaling
        w = w.masked_fill(~allowed[:, None], torch.finfo(w.dtype).min)
        out = torch.matmul(torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), vv)
    else:
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed[:, None], scale=scaling)
    if ctx.cache is not None:  # decode steps attend to every token's keys, as in the plain layer
        ctx.cache.layers[layer].keys, ctx.cache.layers[layer].values = keys, values
    return out.transpose(1, 2).contiguous()


def place(sel, sub, rest_states, rest, n: int) -> torch.Tensor:
    """[B, H, n, d]: the selected slots' ``sel`` [B, H, m, d] and the skipped ones' [B, H, c, d] at their
    slots of the base segment (padding rows go to a column that is cut)."""
    b, h, _, d = sel.shape
    out = sel.new_zeros(b, h, n + 1, d)
    for states, seg in ((sel, sub), (rest_states, rest)):
        at = torch.where(seg.valid, seg.gather, n).to(sel.device)
        out.scatter_(2, at[:, None, :, None].expand(-1, h, -1, d), states)
    return out[:, :, :n]
