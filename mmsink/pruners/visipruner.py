"""VisiPruner (Fan et al., EMNLP 2025): three stages of cross-modal interaction.

shallow (layers < S): the published zeroing of attention weights without renormalisation, computed
  from per-key-group partial outputs and log-sum-exps; layers 1..S-1 drop text->image mass. Layer 0
  follows the official code's rule for the model (EIT-NLP/VisiPruner,
  ``llava/model/language_model/custom_modeling_llama.py``, ``LlamaAttention.forward``): 7B (32 layers)
  gives image queries no image keys and moves text queries' image mass onto each image's first token;
  13B (40 layers) gives image queries no image keys and text queries lose the first half of the
  visual tokens (int(total / 2), the official ``vis_half_index``), keeping the second half's mass as is.
  The official code picks the rule from the checkpoint's name; mmsink from the depth (40 layers: 13B,
  else 7B) unless ``first_layer_rule`` names it ("7b", "13b"; False: no layer-0 rule).
  Same numbers as editing the softmax matrix, at the cost of one fused attention. Prompt rows only
  (decode steps are not masked in the paper; rows past the prompt are treated the same way).
middle (layers >= S+1): the last prompt token's attention output o and each image token's contribution
  c_j = a_j v_j (all heads, before o_proj). The first layer where some cos(o - c_j, o) < layer_threshold
  is the fusion layer; from the next layer only critical tokens (||c_j|| > tokens_threshold) stay.
  With a budget (fixed-budget variant) the top-K tokens by ||c_j|| stay instead.
deep: after pruning, the same test with deep_threshold on the kept tokens; after ``deep_passes`` layers
  where no token moves the output, the next layer drops every image token.
Decisions are per sample: samples of a batch may fuse at different layers. An observed layer's test and
decision (``observe_decide``) replay on a GPU as one CUDA graph per input signature (``core.graphs.Graphed``)
while the segment has the input's width."""

from __future__ import annotations

import dataclasses

import torch

from ..core.attention import group_indices, repeat_kv, reweighted_attention
from ..core.graphs import Graphed
from .base import (
    Pruner,
    anchor_probs,
    anchor_softmax,
    budget_count,
    budget_sizes,
    check_size,
    image_candidates,
    pick_per_image,
    register,
)

MASK_BATCH = 8  # fixed budget: from this batch size on, dropped tokens are masked until the fallback


@register
class VisiPruner(Pruner):
    name = "visipruner"

    @dataclasses.dataclass
    class Options:
        shallow: bool = True
        middle: bool = True
        deep: bool | None = None  # default: on when adaptive, off with a fixed budget
        shallow_mid_layer: int | None = None  # S; default 6 of 32 layers, scaled to depth
        layer_threshold: float = 0.995
        tokens_threshold: float = 0.2
        deep_threshold: float = 0.999
        deep_passes: int = 2
        first_layer_rule: bool | str = True  # True: by depth (40 layers: "13b", else "7b"); False: none
        fallback_layer: int | None = None  # fixed budget: decide here if no fusion was found (default L//2)
        # fixed budget: until the fallback, mask dropped tokens at the segment's width instead of gathering
        # the kept ones after a read per observed layer (kept sets and stats are the same either way). None:
        # on for a batch of MASK_BATCH samples or more (a batch runs as wide as its widest sample, so a gather
        # narrows it only once every sample has fused, while each observed layer's read drains the GPU's
        # queue); True: always. Off by default, the method's own plan: the masked path runs every layer up
        # to the fallback at full width (twice the gathered plan's time on the H200 at batch 16:
        # evals/results/gpu_next/h200/visipruner_b16_masked.md)
        mask_until_fallback: bool | None = False

    def check_options(self):
        o = self.options
        for name in ("layer_threshold", "deep_threshold"):
            if not -1.0 <= getattr(o, name) <= 1.0:
                raise ValueError(f"mmsink: visipruner {name} is a cosine, it must lie in [-1, 1]")
        if o.tokens_threshold < 0:
            raise ValueError("mmsink: visipruner tokens_threshold must be >= 0")
        if o.deep_passes < 1:
            raise ValueError("mmsink: visipruner deep_passes must be >= 1")
        if o.first_layer_rule not in (True, False, "7b", "13b"):
            raise ValueError(
                "mmsink: visipruner first_layer_rule must be True (by depth), False, '7b' or '13b'"
            )
        if o.mask_until_fallback not in (None, True, False):
            raise ValueError("mmsink: visipruner mask_until_fallback must be None (by batch), True or False")
        if o.shallow_mid_layer is not None and o.shallow_mid_layer < 0:
            raise ValueError("mmsink: visipruner shallow_mid_layer must be >= 0")
        # one CUDA graph per input signature on a GPU, eager off CUDA; it writes none of its inputs, and the
        # plan is done with its keep mask and read (results 0 and 3) at the next layer, before another call
        self.step = Graphed(observe_decide, reuse=True, own=(0, 3))

    def check_model(self, num_layers):
        s = self.options.shallow_mid_layer
        if s is not None and s >= num_layers:
            raise ValueError(
                f"mmsink: visipruner shallow_mid_layer={s} exceeds the model's {num_layers} layers"
            )

    def shallow_layers(self, num_layers: int) -> int:
        s = self.options.shallow_mid_layer
        return max(1, round(6 * num_layers / 32)) if s is None else s

    def report(self, ctx):
        return {"fusion_layer": ctx.run["fused_at"].tolist()}

    def layer0_rule(self, num_layers: int) -> str | None:
        r = self.options.first_layer_rule
        if r is True:
            return "13b" if num_layers == 40 else "7b"
        return r or None

    def start(self, ctx):
        b = ctx.layout.batch
        dev = ctx.layout.is_image.device
        deep = self.options.deep if self.options.deep is not None else self.budget is None
        fallback, mask = self.options.fallback_layer, self.options.mask_until_fallback
        if self.budget is not None and fallback is None:
            fallback = ctx.num_layers // 2
        ctx.run = {
            "S": self.shallow_layers(ctx.num_layers),
            "rule0": self.layer0_rule(ctx.num_layers),
            "deep": deep,
            "fallback": fallback,
            "fused_at": torch.full((b,), -1, dtype=torch.long, device=dev),
            "layer_ids": torch.arange(ctx.num_layers, device=dev),  # a layer's index on the device, as a view
            "quiet": torch.zeros(b, dtype=torch.long, device=dev),
            "done": torch.zeros(b, dtype=torch.bool, device=dev),
            "testing": torch.ones(b, dtype=torch.bool, device=dev),  # would run the test alone (see below)
            # fixed budget: every sample has fused by the fallback layer, so until then dropped tokens are
            # masked at the segment's width (no read per layer) and the fallback's decision gathers them
            "masked": (b >= MASK_BATCH if mask is None else mask)
            and fallback is not None
            and not deep
            and fallback < ctx.num_layers - 1,
        }

    def settled(self, ctx, layer):
        # past the shallow stage, every sample decided (fused, and done with the deep test if on)
        run = ctx.run
        return layer > run["S"] and not (self.options.middle and observing(ctx))

    def directive(self, ctx, layer):
        run, o = ctx.run, self.options
        if ctx.seg.masked:
            carry_views(ctx)
        d = {}
        if o.shallow and layer < run["S"]:
            d["reweight"] = lambda q, k, v, mask, scale, base: shallow_attention(
                ctx, layer, q, k, v, mask, scale, base, run["rule0"]
            )
        # the last layer is not watched: no layer is left for its decision
        if o.middle and run["S"] + 1 <= layer < ctx.num_layers - 1 and observing(ctx):
            d["observe"] = True
        return d or None

    def after_layer(self, ctx, layer, hidden, observed):
        # Decisions stay on the device; the plan reads them once before the next layer.
        if "q" not in observed:
            return
        run, o = ctx.run, self.options
        a = contribution_flops(ctx, observed)
        has_vis = ctx.seg.cache.get("visipruner_has_vis")  # per segment: one op less per layer
        if has_vis is None:
            has_vis = ctx.seg.cache["visipruner_has_vis"] = ctx.visual().any(1)
        images = None
        if self.budget is not None:
            images = budget_candidates(ctx, self.budget)
        # a segment narrower than the input's has a width set by the data (an adaptive fusion's gather): a
        # graph of it would be captured for one prompt, so it runs eagerly
        step = self.step if ctx.seg.n == ctx.segments[0].n else observe_decide
        deep = (run["quiet"], run["done"]) if run["deep"] else None
        fallback = run["fallback"]
        keep, run["fused_at"], run["testing"], testing_any, deep = step(
            ctx.seg.valid,
            None if a is not None else observed["q"],
            None if a is not None else observed["k"],
            observed["v"],
            a,
            None if a is not None else ctx.in_prompt(),
            ctx.visual(),
            has_vis,
            run["fused_at"],
            run["layer_ids"][layer],
            deep,
            images,
            observed["scale"],
            (o.layer_threshold, o.tokens_threshold, o.deep_threshold, o.deep_passes),
            fallback,
        )
        if deep is not None:
            run["quiet"], run["done"] = deep
        if run["masked"]:  # no read before the fallback; from it every sample has fused (no deep stage)
            if layer >= fallback:
                ctx.host["visipruner_observing"] = False
            ctx.decide(keep, masked=layer < fallback)
            return
        # read with the next layer's plan (one read: whether a token goes, and whether to watch on)
        ctx.to_read["visipruner_observing"] = testing_any
        ctx.decide(keep)


def observe_decide(valid, *args):
    """``observe_step(*args)`` and what the plan takes of it, in the same graph: (the keep mask over every
    slot of ``valid`` [B, n], text kept as ``Prefill.keep_text`` keeps it; the new ``fused_at``;
    ``testing``; whether some sample still tests, as a long for the plan's read; the deep state)."""
    keep_vis, fused_at, testing, deep = observe_step(*args)
    keep = torch.where(args[5], keep_vis, valid)  # args[5]: the visual slots
    return keep, fused_at, testing, testing.any().long(), deep


def observe_step(q, k, v, a, prompt, vis, has_vis, fused_at, layer, deep, images, scale, limits, fallback):
    """One observed layer's test and decision, per sample: (the kept visual slots [B, n], the new
    ``fused_at``, ``testing`` [B], the deep stage's new (quiet, done) or None). The anchor row's attention
    ``a`` [B, H, n] or, where None, its softmax over the ``prompt`` slots from ``q`` [B, H, d], ``k``
    [B, Hkv, n, d] and ``scale``; ``v`` [B, Hkv, n, d]; ``vis`` [B, n] the visual slots; ``has_vis`` [B];
    ``layer`` the layer's index (0-dim, on the device: one graph for every layer); ``deep`` (quiet, done)
    or None (no deep stage); ``images``: the fixed budget's candidates (``budget_candidates``) or None
    (adaptive: the critical tokens); ``limits`` (layer_threshold, tokens_threshold, deep_threshold,
    deep_passes); ``fallback`` the layer that decides every sample still waiting, or None. Tensors in and
    out, no host read: ``Graphed`` replays it as one CUDA graph."""
    layer_threshold, tokens_threshold, deep_threshold, deep_passes = limits
    if a is None:
        a = anchor_softmax(q, k, prompt, scale)
    cos, cnorm = contribution(a, v, vis)
    unfused = fused_at < 0
    fuse = unfused & (cos < layer_threshold).any(1)
    if fallback is not None:  # the layer on the device: no graph of its own for the fallback layer
        fuse |= unfused & has_vis & (layer >= fallback)
    # critical tokens are computed whether or not a sample fuses here: finding out would cost a sync
    if images is None:
        critical = vis & (cnorm > tokens_threshold)
    else:
        critical = pick_per_image(cnorm, images, vis)
    keep_vis = torch.where(fuse[:, None], critical, vis)
    fused_at = torch.where(fuse, layer, fused_at)
    if deep is not None:
        quiet, done = deep
        waits = ~unfused & ~done
        moved = (cos < deep_threshold).any(1)
        quiet = quiet + (waits & ~moved).long()
        drop = waits & (quiet >= deep_passes)
        keep_vis = keep_vis & ~drop[:, None]
        deep = quiet, done | drop
    waiting = fused_at < 0
    if deep is not None:
        waiting = waiting | ~deep[1]
    return keep_vis, fused_at, waiting & has_vis, deep


def budget_candidates(ctx, budget) -> tuple:
    """Per image, (its candidate slots [B, n], the first k of a sorted row [B, n]) with k its budget, as
    ``base.topk_per_image`` builds them; kept per segment (``visipruner_topk``)."""
    check_size(budget, [n for s in budget_sizes(ctx) for n in s])
    images = ctx.seg.cache.get("visipruner_topk")
    if images is None:
        k_of = lambda n, cur: budget_count(budget, n)  # noqa: E731
        images = image_candidates(ctx.image_of(), ctx.layout.counts, k_of, ctx.budget_per == "prompt")
        ctx.seg.cache["visipruner_topk"] = images
    return images


# this pruner's per-segment memos; on a masked segment they hold for the samples still testing (nothing of
# theirs is masked), the only ones that use them
MEMOS = ("visipruner_has_vis", "visipruner_own", "visipruner_topk")


def carry_views(ctx) -> None:
    """A masked segment has its predecessor's slots, some masked: the plan's views of it (``visual``,
    ``in_prompt``, the anchor's slot) are the predecessor's on the slots still valid, one op each instead of
    a gather and a search per layer; the anchor (text) is never masked."""
    seg, prev = ctx.segments[-1], ctx.segments[-2]
    if seg.idx is not prev.idx:
        return
    new, old = seg.cache, prev.cache
    if "anchor" in old:
        new.setdefault("anchor", old["anchor"])
    for name in ("visual", "in_prompt"):
        if name in old and name not in new:
            new[name] = old[name] & seg.valid
    for name in MEMOS:
        if name in old:
            new.setdefault(name, old[name])


def observing(ctx) -> bool:
    """Some sample still waits to fuse (or for its deep test), as read before this layer."""
    return bool(ctx.host.get("visipruner_observing", True))


def contribution_flops(ctx, observed):
    """Count the contribution test's FLOPs; returns the anchor row's attention where the layer edits it
    (VAR: ``edit_probs``, computed here), else None (``observe_step`` computes it). The batch tests while
    any sample waits; a sample alone tests only while it waits itself (``run["testing"]``, as read before
    this layer), on its own slots: its FLOPs are counted so, the batch's as executed."""
    q, k, v = observed["q"], observed["k"], observed["v"]
    b, h, n, d = k.shape[0], q.shape[1], k.shape[2], k.shape[3]
    a = None
    if observed.get("edit_probs") is not None:
        counted = ctx.extra_flops
        a = anchor_probs(ctx, observed)  # [B, H, n]
        ctx.extra_flops = counted  # counted below, as when the step computes it
    per_real = ctx.seg.cache.get("visipruner_own")  # per segment, not per layer
    if per_real is None:
        per_real = ctx.seg.cache["visipruner_own"] = 6 * h * v.shape[3] * ctx.seg.valid.sum(1)
    own = per_real * ctx.run["testing"]  # [B] on the device: no read
    ctx.add_flops(2 * b * h * n * d + 4 * b * h * n * v.shape[3], own)
    return a


def contribution(a, v, vis):
    """cos(o - c_j, o) and ||c_j|| for every current slot (cos inf on non-``vis`` slots), from the anchor
    row's attention ``a`` [B, H, n] and ``v`` [B, Hkv, n, d]: o = sum_j a_j v_j and c_j = a_j v_j with all
    heads concatenated."""
    h = a.shape[1]
    v = repeat_kv(v, h // v.shape[1])
    vv = v.float()
    o = torch.einsum("bhn,bhnd->bhd", a, vv)
    vo = torch.einsum("bhnd,bhd->bhn", vv, o)
    oo = o.pow(2).sum((1, 2))[:, None]
    co = (a * vo).sum(1)
    # ||v_j||^2 read from v in its own dtype, widened inside the reduction (no fp32 square of every value
    # made first: at batch 16 that was two more passes over a [B, H, n, d] float32 tensor per layer)
    cc = (a.pow(2) * torch.linalg.vector_norm(v, dim=-1, dtype=torch.float32).square()).sum(1)
    diff = (torch.sub(oo, co, alpha=2) + cc).clamp(min=0).sqrt()  # oo - 2 co + cc (2 co is exact)
    cos = (oo - co) / (oo.sqrt() * diff).clamp(min=1e-30)
    return torch.where(vis, cos, float("inf")), cc.sqrt()


def shallow_widths(ctx) -> list[int] | None:
    """The widths of the shallow stage's row sets and key groups (as ``shallow_attention`` builds them)
    from the layout's host facts, on the full segment (slot = position): text rows after the first image
    up to the anchor, those plus the prompt's image rows, the non-image keys, each image's keys, the first
    and second half of the sample's visual keys (the 13B layer-0 rule)."""
    lay = ctx.layout
    if len(ctx.segments) > 1:
        return None
    txt, rule0, keys, images = [], [], [], []
    for n, a, f, p, sizes in zip(lay.lengths, lay.anchors, lay.first_image, lay.prompt_images, lay.sizes):
        t = a - f + 1 - p if f <= a else 0
        txt.append(t)
        rule0.append(t + p)
        keys.append(n - sum(sizes))
        images.append(sizes)
    per_image = [max((s[m] if m < len(s) else 0 for s in images), default=0) for m in range(lay.max_images)]
    halves = [
        max((sum(s) // 2 for s in images), default=0),
        max((sum(s) - sum(s) // 2 for s in images), default=0),
    ]
    return [max(txt), max(rule0), max(keys), *per_image, *halves]


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a float32 factor of a product with a float32 mass: a half-precision one as it is (the
    product promotes it exactly, with no copy first), others as ``x.float()``."""
    return x if x.dtype in (torch.bfloat16, torch.float16) else x.float()


def shallow_attention(ctx, layer, q, k, v, mask, scale, base, rule0):
    """The published edit on the rows it changes (prompt text rows after an image; at layer 0 also image
    rows): no renormalisation, so key groups simply lose (or move) their mass. ``rule0``: the layer-0
    rule ("7b", "13b" or None)."""
    seg = ctx.seg
    rule = rule0 if layer == 0 else None
    vis = ctx.visual()
    # the shallow layers share one segment: rows and key groups are indexed once, sized from the host
    # (no read, so the host need not wait for the vision tower here; a later segment reads each width)
    memo = seg.cache.setdefault("visipruner_shallow", {})
    if not memo:  # both row sets (layer 0 with the first-layer rule, the others) and the key groups
        prompt = ctx.in_prompt()
        txt = prompt & ~vis & (vis.cumsum(1) > 0)
        img = ctx.image_of()
        images = ctx.layout.max_images
        members = [txt, txt | (vis & prompt), seg.valid & ~vis]
        members += [img == m for m in range(images)]
        if rule0 == "13b":  # the halves only where the 13B rule reads them
            nvis = ctx.layout.counts.sum(1, keepdim=True)  # the sample's visual tokens (device, no read)
            first_half = vis & (vis.cumsum(1) <= nvis // 2)
            members += [first_half, vis & ~first_half]
        widths = (shallow_widths(ctx) or [None] * len(members))[: len(members)]
        memo[False], memo[True], *groups = map(group_indices, members, widths)
        memo["groups"], memo["halves"] = groups[: 1 + images], [groups[0], *groups[1 + images :]]
    groups = memo["halves"] if rule == "13b" else memo["groups"]
    rows = memo[rule is not None]

    def mix(outs, masses, ri, vv):
        new = masses[0][..., None] * wide(outs[0])  # the non-image keys keep their mass
        if rule is None:
            return new  # layers 1..S-1: text rows drop the image mass
        # every edited row is a text row after an image or (layer 0) an image row; -1 padding is discarded
        h, d = vv.shape[1], vv.shape[3]
        is_img = vis.gather(1, ri.clamp(min=0)) & (ri >= 0)
        txt_row = (~is_img & (ri >= 0))[:, None, :, None]
        if rule == "7b":  # text rows move each image's mass onto its first token; image rows lose it
            for g, m_g in zip(groups[1:], masses[1:]):
                first = g[:, :1].clamp(min=0)
                v_first = vv.gather(2, first[:, None, :, None].expand(-1, h, 1, d))
                new = new + torch.where(txt_row, m_g[..., None] * wide(v_first), 0.0)
        elif rule == "13b":  # text rows keep the second half's mass as is; image rows lose every image key
            new = new + torch.where(txt_row, masses[2][..., None] * wide(outs[2]), 0.0)
        return new

    # a group whose output is never read: the fused kernel's LSE gives its mass (one image; 13B: 1st half)
    skip = 1 if ctx.layout.max_images == 1 or rule == "13b" else None
    # layers 1..S-1 share their rows and groups: their masks and indices are made once
    kept = memo.setdefault(("attention", rule), {})
    # only the 7B rule moves the skipped group's (the one image's) mass
    out, flops = reweighted_attention(
        q, k, v, mask, seg.valid, scale, base, rows, groups, mix, skip, seg.dense, kept, rule == "7b"
    )
    ctx.attn_flops[layer] = flops
    return out
