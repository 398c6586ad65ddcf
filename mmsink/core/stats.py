"""What the last prefill did."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    method: str | None
    budget: int | float | None
    kept_tokens: list[list[int]]  # [layer][sample] visual tokens the layer processed
    kept_indices: list[list[list[int]]]  # [layer][sample] sequence indices of those visual tokens
    visual_tokens: list[int]  # [sample] visual tokens in the input
    prefill_flops: int  # FLOPs the last prefill executed (vision tower, projector, LM, lm_head, selection)
    baseline_prefill_flops: int  # the same inputs without mmsink
    tokens_per_layer: list[int] = field(default_factory=list)  # padded slots each layer ran on
    extra: dict = field(default_factory=dict)  # method-specific facts (e.g. fusion layers)

    @property
    def flops_ratio(self) -> float:
        return self.prefill_flops / max(self.baseline_prefill_flops, 1)

    @property
    def mean_kept(self) -> float:
        """Average visual tokens per layer per sample (the usual 'budget' convention)."""
        rows = [sum(layer) / max(len(layer), 1) for layer in self.kept_tokens]
        return sum(rows) / max(len(rows), 1)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "kept_tokens": self.kept_tokens,
            "visual_tokens": self.visual_tokens,
            "prefill_flops": self.prefill_flops,
            "baseline_prefill_flops": self.baseline_prefill_flops,
            "flops_ratio": self.flops_ratio,
            "mean_kept": self.mean_kept,
            "extra": self.extra,
        }


# ---- building Stats after a prefill (on request: their host work stays off the forward path)


@dataclass(frozen=True)
class Meter:
    """What the stats of a wrapped model's prefill are computed with."""

    method: str | None
    budget: int | float | None
    cost: object  # DecoderCost of the language model
    num_layers: int
    plans_text: bool = False  # the pruner plans prompts without images too


def sample_flops(meter: Meter, lay, per_image, tokens, rows, extra=0.0, pre_lm=False, own=None):
    """What each sample would execute alone (no padding): its own tokens per layer, its images, and its
    share of the batch's selection work ``extra`` that no pruner counted per sample. Selection runs over
    padded slots, so an even split (extra / B) would charge a sample for the others' padding. Before the
    LLM (``pre_lm``) that work is the vision stage's: shared by the tower's work on each sample's images
    (exact for work the same on every tile, as CLIP's [CLS] scores). In the LLM it runs over the sequence:
    a sample gets its own tokens' share of the padded slots (B x length), the padding's share is nobody's
    (exact for work linear in the tokens it reads: FastV's scores). ``own`` [B]: selection work a
    pruner counted per sample itself (``Prefill.add_flops``), added as it is. A sample without images
    gets none: alone, nothing would be selected."""
    images = (lay.counts > 0).sum(1).tolist()
    real = lay.lengths
    starts = [sum(images[:i]) for i in range(len(images))]
    tower = [sum(per_image[s : s + n]) for s, n in zip(starts, images)]  # each sample's images
    slots = lay.batch * lay.length
    out, base = [], []
    for i, per_layer in enumerate(tokens):
        r = min(rows, real[i])
        v = tower[i]
        share = mine = 0.0
        if images[i] or meter.plans_text:  # alone, a prompt without images is untouched, unless planned
            share = extra * v / max(sum(tower), 1) if pre_lm else extra * real[i] / max(slots, 1)
            mine = own[i] if own is not None else 0.0
        out.append(int(v + meter.cost.prefill(1, per_layer, r) + share + mine))
        base.append(int(v + meter.cost.prefill(1, [real[i]] * meter.num_layers, r)))
    return out, base


def owned(parts: list, b: int) -> list:
    """Per sample, the selection work pruners counted for it (host lists and device tensors, summed)."""
    out = [0.0] * b
    for part in parts:
        vals = part.tolist() if hasattr(part, "tolist") else part
        out = [a + float(x) for a, x in zip(out, vals)]
    return out


def plain_stats(meter: Meter, layout, logits_to_keep, vision) -> Stats:
    """An untouched prefill (no image, or nothing to do): every token in every layer."""
    from .flops import lm_rows

    b, length, n = layout.batch, layout.length, meter.num_layers
    rows = lm_rows(logits_to_keep, length)
    flops = vision[0] + meter.cost.prefill(b, [length] * n, rows)
    vis = layout.is_image.sum(1).tolist()
    idx = [layout.is_image[i].nonzero().squeeze(1).tolist() for i in range(b)]
    sample, _ = sample_flops(meter, layout, vision[1], [[r] * n for r in layout.lengths], rows)
    extra = {"sample_prefill_flops": sample, "sample_baseline_prefill_flops": sample}
    return Stats(meter.method, meter.budget, [vis] * n, [idx] * n, vis, flops, flops, [length] * n, extra)


def prefill_stats(meter: Meter, ctx, logits_to_keep, vision, report) -> Stats:
    """A planned prefill: kept visual tokens per layer and sample, executed and baseline FLOPs, and what
    the pruner (``report(ctx)``) and the sink methods add."""
    from .flops import lm_rows
    from .plan import gather_rows

    lay = ctx.layout
    b, length = lay.batch, lay.length
    rows = lm_rows(logits_to_keep, length)
    flops = vision[0] + meter.cost.prefill(b, ctx.slots, rows, ctx.attn_flops) + ctx.extra_flops
    base = vision[0] + meter.cost.prefill(b, [length] * meter.num_layers, rows)
    per_seg_idx = []
    for s in ctx.segments:
        vis = gather_rows(lay.is_image, s.idx) & s.valid
        per_seg_idx.append([s.idx[i][vis[i]].tolist() for i in range(b)])
    kept_idx = [per_seg_idx[s] for s in ctx.layer_segment]
    kept = [[len(x) for x in row] for row in kept_idx]
    valid_counts = [s.valid.sum(1).tolist() for s in ctx.segments]
    per_sample = [[valid_counts[s][i] for s in ctx.layer_segment] for i in range(b)]
    pre_lm = bool(ctx.layer_segment) and ctx.layer_segment[0] != 0  # layer 0 already ran on a selection
    shared = ctx.extra_flops - ctx.owned_flops
    own = owned(ctx.own_flops, b)
    sample, sample_base = sample_flops(meter, lay, vision[1], per_sample, rows, shared, pre_lm, own)
    extra = {"sample_prefill_flops": sample, "sample_baseline_prefill_flops": sample_base, **report(ctx)}
    if ctx.vit is not None:
        extra["vit_sinks"] = ctx.vit_sinks if ctx.vit_sinks is not None else [[] for _ in range(b)]
    if ctx.var_codes:
        extra["var_sinks"] = {
            layer: {"visual": (c == 2).sum(1).tolist(), "text": (c == 1).sum(1).tolist()}
            for layer, c in ctx.var_codes.items()
        }
    visual = lay.is_image.sum(1).tolist()
    return Stats(meter.method, meter.budget, kept, kept_idx, visual, flops, base, list(ctx.slots), extra)
