"""VAR — Visual Attention Redistribution (Kang et al., ICLR 2025), on the grouped log-sum-exp primitive.

Per layer (default 2..L-2), keys fall in four groups: text sinks, visual sinks, visual non-sinks, other.
A token is a sink when phi(x) = max_{d in sink dims} |x_d / RMS(x)| > tau on the hidden state entering
the layer (prompt tokens only; generated tokens never are). For each (sample, head, query row) after the
image, in prefill and in every decode step, the head is image-centric when its image mass >= 0.2 and its
visual non-sink share >= rho (the paper's test; the official code inverts it) and the sample has a visual
sink in this layer. Then sinks keep (1 - p) of their weight and the freed mass goes to the visual
non-sink tokens in proportion to their weight (the paper's p; the official code keeps p instead).
Only group masses change, so the result comes from per-group partial outputs: no attention matrix.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.attention import group_indices, grouped_attention, reweighted_attention

OTHER, TEXT_SINK, VISUAL_SINK, VISUAL = 0, 1, 2, 3
CODES = (TEXT_SINK, VISUAL_SINK, VISUAL, OTHER)

# The paper's head-selection threshold rho per kind of task (p = 0.6 and tau = 20 throughout): general
# VQA 0.8, hallucination benchmarks (POPE, CHAIR) 0.5, vision-centric benchmarks 0.9. The official
# repository's only shipped config (LLaVA-1.5-7B) is the hallucination one (rho 0.5).
PRESETS = {"general": {"rho": 0.8}, "hallucination": {"rho": 0.5}, "vision-centric": {"rho": 0.9}}


@dataclasses.dataclass
class VARConfig:
    sink_dims: tuple | None = None  # massive-activation channels; required (see mmsink calibrate)
    tau: float = 20.0
    rho: float = PRESETS["general"]["rho"]
    p: float = 0.6
    image_mass: float = 0.2
    layers: tuple | None = None  # default: 2 .. L-2

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"mmsink: VAR tau must be > 0, got {self.tau}")
        for name in ("rho", "p", "image_mass"):
            x = getattr(self, name)
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"mmsink: VAR {name} must lie in [0, 1], got {x}")
        if self.sink_dims is not None:
            self.sink_dims = tuple(int(d) for d in self.sink_dims)
            if not self.sink_dims or min(self.sink_dims) < 0:
                raise ValueError("mmsink: VAR sink_dims must be a non-empty list of channel indices")

    def check_model(self, num_layers: int, hidden: int) -> None:
        if self.sink_dims is None:
            raise ValueError(
                "mmsink: VAR needs sink_dims (the model's massive-activation channels, e.g. (1415, 2533) for "
                "LLaVA-1.5-7B); give them or find them with `mmsink calibrate`"
            )
        if max(self.sink_dims) >= hidden:
            raise ValueError(f"mmsink: VAR sink_dims {self.sink_dims} exceed the hidden size {hidden}")
        if self.layers is not None and (min(self.layers) < 0 or max(self.layers) >= num_layers):
            raise ValueError(f"mmsink: VAR layers {self.layers} outside the model's {num_layers} layers")

    def active(self, layer: int, num_layers: int) -> bool:
        if self.layers is not None:
            return layer in self.layers
        return 2 <= layer <= num_layers - 2


def make_config(var) -> VARConfig | None:
    if var is None or var is False:
        return None
    if var is True:
        return VARConfig()
    if isinstance(var, VARConfig):
        return var
    if isinstance(var, dict):
        var = dict(var)
        preset = var.pop("preset", "general")
        if preset not in PRESETS:
            raise ValueError(f"mmsink: VAR preset must be one of {sorted(PRESETS)}, got {preset!r}")
        return VARConfig(**{**PRESETS[preset], **var})
    raise ValueError(f"mmsink: var must be True, a dict or a VARConfig, got {type(var).__name__}")


def sink_scores(hidden: torch.Tensor, dims) -> torch.Tensor:
    """phi per token [B, n]: max over sink dims of |x_d| / RMS(x), fp32, no learned weight."""
    x = hidden.float()
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    return (x[..., list(dims)].abs() / rms).amax(-1)


def key_codes(hidden, visual, prompt, cfg: VARConfig) -> torch.Tensor:
    """[B, n] group code of each slot of the layer's input."""
    sink = (sink_scores(hidden, cfg.sink_dims) > cfg.tau) & prompt
    codes = torch.where(sink, torch.full_like(visual, TEXT_SINK, dtype=torch.long), OTHER)
    codes = torch.where(visual, torch.where(sink, VISUAL_SINK, VISUAL), codes)
    return codes


def var_mix(cfg: VARConfig, has_visual_sink):
    """New outputs of the edited rows from the four groups' partial outputs and masses (``CODES`` order):
    in image-centric heads the sinks keep (1 - p) of their mass, the visual non-sinks get the rest."""

    def mix(outs, masses, ri=None, vv=None):
        m_ts, m_vs, m_v, m_o = masses
        o_ts, o_vs, o_v, o_o = (o.float() for o in outs)
        img = m_vs + m_v
        chosen = (img >= cfg.image_mass) & (m_v >= cfg.rho * img) & (m_v > 0) & has_visual_sink
        p = torch.where(chosen, cfg.p, 0.0)
        freed = p * (m_ts + m_vs)
        new = (1 - p)[..., None] * (m_ts[..., None] * o_ts + m_vs[..., None] * o_vs)
        return new + (m_v + freed)[..., None] * o_v + m_o[..., None] * o_o

    return mix


def groups_of(codes, valid):
    """[G, B, kv] membership of each key group (``CODES`` order) and [B, 1, 1] whether a sample has a
    visual sink among its valid keys."""
    groups = torch.stack([(codes == c) & valid for c in CODES])
    return groups, groups[CODES.index(VISUAL_SINK)].any(1)[:, None, None]


def decode_attention(q, k, v, valid, codes, scale, cfg: VARConfig):
    """VAR for a decode step whose every query row is edited (``generate_fast``): q [B, H, n, d] (n new
    tokens, already in the buffer), k / v [B, kv_heads, slots, d], ``valid`` [B, slots] the filled slots,
    ``codes`` [B, slots]. Returns [B, H, n, d] in q's dtype."""
    groups, has_vs = groups_of(codes, valid)
    allowed = valid[:, None, None, :].expand(-1, 1, q.shape[2], -1)
    outs, masses = grouped_attention(q, k, v, allowed, groups, scale)
    return var_mix(cfg, has_vs)(outs, masses).to(q.dtype)


def var_attention(q, k, v, mask, key_valid, scale, base, codes, rows, cfg: VARConfig):
    """Attention with VAR applied to ``rows`` ([B, n] bool, or [B, R] row indices with -1 padding);
    ``codes`` [B, kv] group of each key."""
    valid = key_valid if key_valid is not None else torch.ones_like(codes, dtype=torch.bool)
    # membership, not index lists: the sink groups change every layer and indexing them costs a device
    # read each; with VAR's few edited rows, attending every key under a group mask is cheap
    groups, has_vs = groups_of(codes, valid)
    mix = var_mix(cfg, has_vs)
    return reweighted_attention(q, k, v, mask, key_valid, scale, base, rows, groups, mix)


def redistribute_rows(probs, codes, rows, cfg: VARConfig):
    """VAR on explicit attention rows: probs [B, H, n] (one query row per sample), codes [B, n],
    rows [B] whether that row is one VAR edits. Used where a pruner reads the attention it ranks by."""
    ts, vs, vn = (codes == TEXT_SINK)[:, None], (codes == VISUAL_SINK)[:, None], (codes == VISUAL)[:, None]
    m_sink = (probs * (ts | vs)).sum(-1)
    m_vs, m_v = (probs * vs).sum(-1), (probs * vn).sum(-1)
    img = m_vs + m_v
    chosen = (img >= cfg.image_mass) & (m_v >= cfg.rho * img) & (m_v > 0) & vs.any(-1) & rows[:, None]
    p = torch.where(chosen, cfg.p, 0.0)[..., None]
    grow = 1 + (p[..., 0] * m_sink / m_v.clamp(min=1e-30))[..., None]
    return torch.where(ts | vs, probs * (1 - p), torch.where(vn, probs * grow, probs))


# ---- the handle's VAR steps: a prefill layer, the anchor row a pruner ranks by, a decode step


def prefill_reweight(ctx, layer: int, hidden, cfg: VARConfig):
    """The attention edit of a prefill layer: key codes from the hidden state entering it, rows after the
    image (instruction, answer and later tokens; indexed once per segment)."""
    seg = ctx.seg
    vis = ctx.visual()
    codes = key_codes(hidden, vis, ctx.in_prompt(), cfg)
    ctx.var_codes[layer] = codes
    if "var_rows" not in seg.cache:
        rows = seg.valid & ~vis & (vis.cumsum(1) > 0)
        seg.cache["var_rows"] = group_indices(rows, ctx.text_after_image_width())
    rows = seg.cache["var_rows"]

    def reweight(q, k, v, mask, scale, base):
        out, flops = var_attention(q, k, v, mask, seg.valid, scale, base, codes, rows, cfg)
        ctx.attn_flops[layer] = flops
        return out

    return reweight


def anchor_edit(ctx, layer: int, anchor, cfg: VARConfig):
    """The anchor row's probabilities as VAR redistributes them (a pruner ranking at a VAR layer)."""
    codes = ctx.var_codes[layer]
    vis = ctx.visual()
    after_image = vis.cumsum(1).gather(1, anchor[:, None])[:, 0] > 0
    return lambda probs: redistribute_rows(
        probs, codes, after_image & ~vis.gather(1, anchor[:, None])[:, 0], cfg
    )


def decode_reweight(cache, layer: int, cfg: VARConfig):
    """The attention edit of a cached decode step: every new row, keys grouped by the prefill's codes."""
    codes = cache.layer_codes[layer]
    valid = cache.segment_valid[cache.layer_segment[layer]]

    def reweight(q, k, v, mask, scale, base):
        rows = torch.arange(q.shape[2], device=q.device).expand(q.shape[0], -1)
        c, ok = codes.to(q.device), valid.to(q.device)
        return var_attention(q, k, v, mask, ok, scale, base, c, rows, cfg)[0]

    return reweight
