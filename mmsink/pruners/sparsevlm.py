"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417), as its official code selects in the default
v1.5 logic (Gumpest/SparseVLMs, main and the v1.5 branch; ``llava/model/language_model/``:
``modelling_sparse_llama.py``, ``LlamaDynamicvitModel.forward``; ``score.py``, ``attn_postprocess_topk``
and the ``sparse_token_list`` tables; ``utils.py``, ``cluster_and_merge``; ``USE_VERSION`` unset, i.e. not
the SparseVLM+ "2_0" mode).

- Text raters, chosen once from the input embeddings: M = softmax over the text tokens after the image
  of V T^T (V the image's embeddings, T the text's), averaged over the visual rows; the raters are the
  text tokens whose M is above M's mean.
- At layers 2, 6 and 15 (of 32; the decision is taken on that layer's attention and applies from the
  next layer on): that layer's softmax attention (causal, scale 1/sqrt(d)), averaged over heads and over
  the raters' query rows, ranks the image's current visual tokens; the top min(k_s, v - 1) stay (v: the
  image's visual tokens now, merged ones included).
- Recycling: of the pruned tokens (their states from the layer's OUTPUT), the top int(0.3 p) + 1 by the
  same score (p pruned) are clustered into int(n / 10) + 1 groups by density-peak clustering (DPC-KNN:
  distances / sqrt(D), density exp(-mean squared distance to the cluster_num nearest, self included),
  centres = top cluster_num by density x distance to the nearest denser token, each token to its nearest
  centre) and each group's mean (sum / (count + 1e-6)) is a new visual token.
- Schedules k_1 / k_2 / k_3 per budget (the budget is the visual tokens averaged over 32 layers; the
  official ``RETAIN_TOKN``): 192 -> 300 / 200 / 110, 128 -> 303 / 110 / 36, 96 -> 238 / 48 / 26,
  64 -> 66 / 30 / 17 (of 576 tokens).

What mmsink does beyond the official code (one image, batch 1, LLaVA-1.5, 32 layers):
- Other budgets and image sizes: a budget is first put in units of a 576-token image (``b * 576 / N`` for
  an int b and an image of N tokens, ``f * 576`` for a fraction f); the schedule is the official table at
  its four budgets and linear between them, between 0 and 64 (from 0 / 0 / 0) and between 192 and 576
  (to 576 / 576 / 576); each k is then scaled back to the image, ``max(1, floor(k * N / 576 + 0.5))``. At
  576 tokens and 192 / 128 / 96 / 64 this is the official table exactly. ``schedule=(k1, k2, k3)`` (in
  576-token units) replaces the table.
- Layers scale with depth: ``floor(l * L / 32 + 0.5)`` (at least 1, increasing; 8 layers -> 1, 2, 4;
  28 -> 2, 5, 13). The official code keeps 2 / 6 / 15 at every depth (e.g. LLaVA-1.5-13B's 40 layers):
  pass ``layers=(2, 6, 15)`` for that.
- Several images a prompt: each image has its own raters (the text after it) and its own schedule and
  recycling (``budget_per="prompt"``: a prompt's images compete for one schedule and are clustered
  together). Batches: every sample its own raters (ragged, only their query rows are scored).
- Positions (mmsink's global choice, as for PDrop): kept tokens keep their original positions (the
  official code re-indexes to 0..n-1 after each drop) and a merged token takes the slot, and so the
  position, of its cluster's centre (a pruned token), so it sits among the kept tokens in position
  order; the official code puts the merged tokens after the kept visual tokens (centre-score order). The
  first decision is the official selection exactly; later ones rank with the original positions.
- The official clustering adds uniform noise of 1e-6 to the densities to break ties; mmsink adds none,
  so runs are deterministic (cached == uncached): exact ties go to the first pooled token (the highest
  rater score). With one cluster (fewer than 10 pooled tokens) every density is exp(0) = 1, so the
  official centre is a random pooled token (which only decides where the merged token sits, not its
  state); mmsink's is the highest-scored one.
- Scores in float32 (the official code: the model's dtype); a VAR edit at a decision layer is not applied
  to the ranking; ViT-sink protected tokens are kept in addition and are never merged or overwritten.
- ``recycle=False`` runs the selection without the merged tokens.
An image with no text after it has no raters: its tokens all score 0 (the first ones stay).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..core.attention import group_indices
from ..core.graphs import Graphed
from ..core.plan import gather_rows
from .base import Pruner, budget_sizes, check_size, register, segment_sum

OFFICIAL_LAYERS = (2, 6, 15)
OFFICIAL_DEPTH = 32
UNIT = 576  # the schedules are for LLaVA-1.5's 576-token image
SCHEDULES = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
MERGE_SHARE = 0.3  # the top 30 % (+ 1) of the pruned tokens are recycled
CLUSTER_EVERY = 10  # into int(n / 10) + 1 groups


def default_layers(num_layers: int) -> tuple[int, ...]:
    out: list[int] = []
    for layer in OFFICIAL_LAYERS:
        s = max(1, math.floor(layer * num_layers / OFFICIAL_DEPTH + 0.5))
        out.append(max(s, out[-1] + 1) if out else s)
    if out[-1] > num_layers - 2:
        raise ValueError(f"mmsink: sparsevlm needs at least 6 decoder layers, the model has {num_layers}")
    return tuple(out)


def schedule_units(units: float) -> tuple[float, ...]:
    """k_1, k_2, k_3 of a 576-token image for a budget of ``units`` tokens (of 576): the official table at
    its budgets, linear between them and towards 0 and 576."""
    units = round(float(units), 6)
    points = [(0.0, (0.0, 0.0, 0.0))] + [(float(b), s) for b, s in sorted(SCHEDULES.items())]
    points.append((float(UNIT), (float(UNIT),) * 3))
    for (b0, s0), (b1, s1) in zip(points, points[1:]):
        if b0 <= units <= b1:
            if units == b1:
                return tuple(float(x) for x in s1)
            t = (units - b0) / (b1 - b0)
            return tuple(a + t * (b - a) for a, b in zip(s0, s1))
    raise ValueError(f"mmsink: sparsevlm budget of {units:.1f} tokens per 576 is out of range")


def stage_tokens(budget, n: int, schedule=None) -> tuple[int, ...]:
    """Tokens an image (or a prompt's images) of ``n`` visual tokens keeps at each decision."""
    if n == 0:
        return (0, 0, 0)
    if schedule is None:
        units = budget * UNIT if isinstance(budget, float) else budget * UNIT / n
        schedule = schedule_units(units)
    return tuple(max(1, math.floor(s * n / UNIT + 0.5)) for s in schedule)


def merged_count(pruned: int) -> int:
    """Merged tokens made of ``pruned`` pruned tokens (official: int(int(0.3 p) + 1) / 10) + 1)."""
    if pruned <= 0:
        return 0
    return (int(pruned * MERGE_SHARE) + 1) // CLUSTER_EVERY + 1


@register
class SparseVLM(Pruner):
    name = "sparsevlm"
    default_budget = 192 / UNIT

    @dataclasses.dataclass
    class Options:
        layers: tuple | None = None
        schedule: tuple | None = None  # k_1, k_2, k_3 in 576-token units (replaces the budget's)
        recycle: bool = True

    def check_options(self):
        ls = self.options.layers
        if ls is not None and (len(ls) != 3 or list(ls) != sorted(set(ls)) or ls[0] < 0):
            raise ValueError("mmsink: sparsevlm layers must be three increasing layer indices >= 0")
        sc = self.options.schedule
        if sc is not None:
            if len(sc) != 3 or any(not isinstance(x, (int, float)) or x <= 0 for x in sc):
                raise ValueError("mmsink: sparsevlm schedule must be three positive token counts (of 576)")
            self.budget = None  # the schedule is the budget
        if not isinstance(self.options.recycle, bool):
            raise ValueError("mmsink: sparsevlm recycle must be True or False")
        # CUDA graphs, one per input signature (eager off CUDA): the raters (two stages around the gather
        # of their embeddings), the rater rows a decision observes, the ranking and the recycling; a
        # prefill's three decisions, two batch shapes
        self.text_slots = Graphed(text_slots, keep=2)
        self.rate = Graphed(rate_text, keep=2)
        self.rater_rows = Graphed(rater_rows, keep=6)
        self.rank = Graphed(rank, keep=6)
        self.merge = Graphed(merge_into, keep=6)

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(self.options.layers) if self.options.layers is not None else default_layers(num_layers)

    def check_model(self, num_layers):
        if self.options.layers is not None and max(self.options.layers) > num_layers - 2:
            raise ValueError(
                f"mmsink: sparsevlm layers {self.options.layers} need a layer after the last one; "
                f"the model has {num_layers}"
            )
        self.layers(num_layers)

    def final_layer(self, ctx):
        return ctx.run["layers"][-1] + 1  # the last decision applies here

    def report(self, ctx):
        return {
            "schedule": {
                "layers": list(ctx.run["layers"]),
                "tokens": ctx.run["k_host"],  # per sample, per image (or prompt): k_1, k_2, k_3
                "recycle": self.options.recycle,
            }
        }

    # ---------------------------------------------------------------------------------------- prefill
    def start(self, ctx):
        sizes = budget_sizes(ctx)
        if self.budget is not None and not isinstance(self.budget, float):
            check_size(self.budget, [n for s in sizes for n in s])
        k_host = [[stage_tokens(self.budget, n, self.options.schedule) for n in s] for s in sizes]
        groups = max((len(s) for s in sizes), default=0)
        table = [[list(k) for k in row] + [[0, 0, 0]] * (groups - len(row)) for row in k_host]
        ctx.run = {
            "layers": self.layers(ctx.num_layers),
            "k_host": k_host,
            "k": torch.tensor(table, dtype=torch.long, device=ctx.device).view(len(sizes), groups, 3),
        }

    def before_llm(self, ctx, embeds):
        """Each image's text raters from the input embeddings (official: ``m_v_t``); one host read (the
        most raters a sample has) comes with layer 0's plan."""
        lay, run = ctx.layout, ctx.run
        b, _, d = embeds.shape
        width = ctx.text_after_image_width()
        vis_w = max((sum(s) for s in lay.sizes), default=0)
        slots_of = text_slots if width is None else self.text_slots  # None: a read, so no graph
        tw = None if width is None else max(width, 1)
        v = max(vis_w, 1)
        at = slots_of(lay.image_of, lay.valid, ctx.in_prompt(), v, tw)
        ctx.extra_flops += 2 * b * v * (at.shape[1] - v) * d
        xs = gather_rows(embeds, at.clamp(min=0))
        member, most = self.rate(xs, at, lay.image_of, v, lay.counts.shape[1])
        run["raters"] = member  # [B, M, L] image m's raters (original indices)
        ctx.to_read["sparsevlm.raters"] = most
        return None

    def directive(self, ctx, layer):
        if layer not in ctx.run["layers"]:
            return None
        seg = ctx.seg
        width = int(ctx.host.get("sparsevlm.raters", 0))
        ctx.run["rows"] = rows = self.rater_rows(ctx.run["raters"], seg.idx, seg.valid, max(width, 1))
        return {"observe": True, "rows": rows}  # rows: [B, R] rater slots, -1 padding

    def after_layer(self, ctx, layer, hidden, observed):
        layers = ctx.run["layers"]
        if layer not in layers:
            return
        stage = layers.index(layer)
        seg, run, lay = ctx.seg, ctx.run, ctx.layout
        rows = run.pop("rows")
        logits = self.scores(ctx, observed)
        b, n = logits.shape[0], logits.shape[3]
        width = self.pool_width(ctx, stage) if self.options.recycle else 0
        per_prompt = ctx.budget_per == "prompt"
        facts = (seg.idx, seg.valid, run["raters"], lay.image_of, run["k"], ctx.protected)
        out = self.rank(logits, observed["scale"], rows, facts, stage, per_prompt, width)
        merged = None
        if width:
            keep, pool = out  # pool [B, G * (W + 1)]: per group its W slots, then its pooled count
            g = run["k"].shape[1]
            w, dm = pool.shape[1] // g - 1, hidden.shape[-1]
            x = gather_rows(hidden, pool[:, : g * w])  # [B, G * W, D] the pooled tokens' states
            new, flat, keep = self.merge(x, pool, keep)
            ctx.extra_flops += 2 * b * g * w * w * dm  # the pairwise distances (as a matmul would count them)
            merged = torch.cat([hidden.reshape(b * n, dm), hidden.new_zeros(1, dm)])
            merged = merged.index_copy(0, flat, new)[: b * n].view(b, n, dm)
        else:
            (keep,) = out
        ctx.decide(keep, counts=self.counts(ctx, stage), hidden=merged)

    def scores(self, ctx, observed) -> torch.Tensor:
        """[B, H, R, n] the raters' query rows' q.k (unscaled, the model's dtype; ``rank`` ranks on them)."""
        q, k = observed["q_rows"], observed["k"]
        b, h, r, d = q.shape
        kk = k.repeat_interleave(h // k.shape[1], dim=1) if h != k.shape[1] else k
        ctx.extra_flops += 2 * b * h * r * kk.shape[2] * d
        return torch.einsum("bhrd,bhnd->bhrn", q, kk)

    def pool_width(self, ctx, stage) -> int:
        """The most pruned tokens a group recycles (int(0.3 p) + 1): from the host counts when known, else
        a bound from the group sizes."""
        counts = self.host_groups(ctx)
        if counts is None:
            most = max((n for s in budget_sizes(ctx) for n in s), default=0)
            return int(most * MERGE_SHARE) + 1 if most else 0
        out = 0
        for row, ks in zip(counts, ctx.run["k_host"]):
            for cur, k in zip(row, ks):
                p = cur - min(k[stage], max(cur - 1, 0)) if cur else 0
                out = max(out, int(p * MERGE_SHARE) + 1 if p > 0 else 0)
        return out

    def host_groups(self, ctx) -> list | None:
        """Per sample, each group's current visual tokens (host ints) when the plan knows them."""
        seg = ctx.seg
        if seg.counts is None or ctx.protected is not None or ctx.pending is not None:
            return None
        if ctx.budget_per == "prompt":
            return [[sum(vis)] if vis else [] for _, vis in seg.counts]
        return [list(vis) for _, vis in seg.counts]

    def counts(self, ctx, stage) -> list | None:
        groups = self.host_groups(ctx)
        if groups is None:
            return None
        out = []
        for (text, _), row, ks in zip(ctx.seg.counts, groups, ctx.run["k_host"]):
            new = []
            for cur, k in zip(row, ks):
                kept = min(k[stage], max(cur - 1, 0))
                new.append(kept + (merged_count(cur - kept) if self.options.recycle else 0))
            out.append((text, new))
        return out


def cluster_and_merge(x: torch.Tensor, valid: torch.Tensor, clusters: torch.Tensor):
    """Density-peak clustering of each group's tokens (the official ``cluster_and_merge``, batched with
    padding, without its 1e-6 density noise). x [G, W, D] float32 (tokens in descending score order),
    valid [G, W], clusters [G] (<= the valid count). Returns (merged [G, C, D], centre [G, C] token index
    of each cluster's centre, ok [G, C]) with C = W // 10 + 1; cluster c's mean is merged[:, c]. No host
    read: ``SparseVLM.merge`` replays it as a CUDA graph."""
    g, w, d = x.shape
    cw = w // CLUSTER_EVERY + 1
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / d**0.5
    near = torch.arange(w, device=x.device)[None] < clusters[:, None]  # the `clusters` nearest
    nearest = dist.masked_fill(~valid[:, None], float("inf")).sort(-1).values
    sq = torch.where(near[:, None], nearest.square(), torch.zeros_like(nearest))
    density = torch.exp(-sq.sum(-1) / clusters.clamp(min=1)[:, None])
    denser = (density[:, None, :] > density[:, :, None]) & valid[:, None, :]  # [G, i, j]: j denser than i
    pair = valid[:, :, None] & valid[:, None, :]
    dist_max = dist.masked_fill(~pair, float("-inf")).flatten(1).max(1).values
    parent = torch.where(denser, dist, dist_max[:, None, None]).min(-1).values
    score = (parent * density).masked_fill(~valid, float("-inf"))
    centre = score.argsort(dim=-1, descending=True, stable=True)[:, :cw]
    if centre.shape[1] < cw:
        centre = torch.cat([centre, centre.new_zeros(g, cw - centre.shape[1])], 1)
    ok = torch.arange(cw, device=x.device)[None] < clusters[:, None]
    to_centre = dist.gather(1, centre[..., None].expand(-1, -1, w)).masked_fill(~ok[..., None], float("inf"))
    assign = to_centre.argmin(1)  # [G, W]: the first nearest centre
    ids = torch.arange(cw, device=x.device)[None].expand(g, cw)
    assign = torch.cat([assign, assign.new_zeros(g, 1)], 1)
    assign.scatter_(1, torch.where(ok, centre, w), ids)  # a centre joins its own cluster
    assign = torch.where(valid, assign[:, :w], cw)  # padding to a spare cluster
    count = torch.zeros(g, cw + 1, device=x.device).scatter_add_(1, assign, torch.ones_like(x[..., 0]))
    weight = 1.0 / (count.gather(1, assign) + 1e-6)
    merged = segment_sum(x * weight[..., None], assign, cw + 1)
    return merged[:, :cw], centre, ok


# ------------------------------------------------------------------------------------------------------
# The selection's tensor work, replayed as CUDA graphs by the pruner's ``Graphed`` (tensors and plain
# values in, tensors out; no host read, no tensor built from host data).


def text_slots(image_of, valid, in_prompt, vis_w: int, text_w):
    """[B, V + W]: the visual slots (V = ``vis_w``), then the text slots after the first image and up to
    the anchor (``in_prompt``: the plan's; W = ``text_w``; None: read from the device, eager only), each
    left-aligned, -1 padding."""
    is_image = image_of >= 0
    text = in_prompt & ~is_image & (is_image.cumsum(1) > 0)
    return torch.cat([group_indices(is_image & valid, vis_w), group_indices(text, text_w)], 1)


def rate_text(xs, at, image_of, v: int, images: int):
    """Each image's raters: (member [B, M, L] bool, the most raters a sample has (0-dim)). at: the
    ``text_slots`` (the first ``v`` visual), xs [B, V + W, D] the embeddings there."""
    b, length = image_of.shape
    rows, cols = at[:, :v], at[:, v:]
    xv = xs[:, :v].float().contiguous()
    xt = xs[:, v:].float().contiguous()
    logits = torch.matmul(xv, xt.transpose(1, 2))  # [B, V, W]
    ar = torch.arange(length, device=xs.device)
    io = torch.where(rows >= 0, image_of.gather(1, rows.clamp(min=0)), -1)
    member = torch.zeros(b, images, length + 1, dtype=torch.bool, device=xs.device)
    for m in range(images):
        last = torch.where(image_of == m, ar[None], -1).max(1).values  # [B] the image's last slot
        allowed = (cols >= 0) & (cols > last[:, None]) & (last[:, None] >= 0)
        vis = io == m
        p = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
        pm = (p * vis[..., None]).sum(1) / vis.sum(1, keepdim=True).clamp(min=1)  # [B, W]
        mean = (pm * allowed).sum(1, keepdim=True) / allowed.sum(1, keepdim=True).clamp(min=1)
        raters = allowed & (pm > mean) & vis.any(1, keepdim=True)
        member[:, m].scatter_(1, torch.where(raters, cols, length), raters)
    member = member[..., :length]
    return member, member.any(1).sum(1).max()


def rater_rows(raters, idx, valid, width: int):
    """[B, R] the current slots of any image's raters, -1 padding (R = ``width``)."""
    return group_indices(gather_rows(raters.any(1), idx) & valid, width)


def rank(logits, scale: float, rows, facts: tuple, stage: int, per_prompt: bool, width: int):
    """A decision's ranking: (keep [B, n] (the text and the kept visual slots),) and, when ``width`` > 0
    (the most pooled tokens a group recycles), the pool [B, G * (W + 1)]: per group the slots of its W
    highest-scored pruned tokens, then how many of them it recycles. logits [B, H, R, n]: the raters'
    rows' q.k; facts: the segment's idx and valid, the raters [B, M, L], the layout's image_of, the k
    table [B, G, 3] and the protected tokens [B, L] (or None)."""
    idx, valid, raters, image_of, k_table, protected = facts
    b, _, _, n = logits.shape
    logits = logits.float() * scale
    slot = torch.arange(n, device=logits.device)
    real = rows >= 0
    allowed = (slot[None, None] <= rows[..., None]) & valid[:, None] & real[..., None]
    probs = torch.softmax(torch.where(allowed[:, None], logits, float("-inf")), -1).nan_to_num(0.0)
    per_row = probs.mean(1)  # [B, R, n]
    orig = idx.gather(1, rows.clamp(min=0))
    w = raters.gather(2, orig[:, None].expand(-1, raters.shape[1], -1)) & real[:, None]
    w = w.float() / w.sum(-1, keepdim=True).clamp(min=1)  # [B, M, R]: each image's raters' weights
    io = torch.where(valid, gather_rows(image_of, idx), -1)
    score = torch.zeros(b, n, device=logits.device)
    for m in range(raters.shape[1]):
        score = torch.where(io == m, (w[:, m, :, None] * per_row).sum(1), score)
    vis = io >= 0
    grp = torch.where(io >= 0, 0, io) if per_prompt else io
    prot = None if protected is None else gather_rows(protected, idx) & valid
    ranks = slot[None]
    chosen = torch.zeros_like(vis)
    pools = []
    for m in range(k_table.shape[1]):
        cand = vis & (grp == m)
        cur = cand.sum(1)
        k = torch.minimum(k_table[:, m, stage], cur - 1).clamp(min=0)
        order = score.masked_fill(~cand, float("-inf")).argsort(dim=1, descending=True, stable=True)
        # the first k <= cur of the order are candidates (finite scores sort before the -inf ones)
        kept = torch.zeros_like(cand).scatter(1, order, ranks < k[:, None])
        if prot is not None:
            kept |= cand & prot
        chosen |= kept
        if not width:
            continue
        p = cur - k if prot is None else (cand & ~kept).sum(1)
        n_sel = (p.double() * MERGE_SHARE).long() + (p > 0)  # int(0.3 p) + 1, 0 when nothing is pruned
        pool = min(width, n)
        if prot is None:  # the pruned are the order's k .. cur - 1, in that order (a stable sort)
            top = order.gather(1, (k[:, None] + slot[:pool]).clamp(max=n - 1))
        else:
            pruned = cand & ~kept
            top = score.masked_fill(~pruned, float("-inf")).argsort(dim=1, descending=True, stable=True)
            top = top[:, :pool]
        pools += [top, n_sel[:, None]]
    keep = torch.where(vis, chosen, valid)  # every real text slot and the chosen visual ones
    if not width:
        return (keep,)
    slots = torch.stack(pools[::2], 1).view(b, -1)
    return keep, torch.cat([slots, torch.stack(pools[1::2], 1).view(b, -1)], 1)


def merge_into(x, pool, keep):
    """The recycling: (merged tokens [B * G * C, D] in x's dtype, their flat slots [B * G * C] (B * n for
    none), keep with the merged tokens' slots added). x [B, G * W, D]: the states at ``rank``'s pool
    slots (pool [B, G * W + G]: the slots, then each group's pooled count); a merged token takes its
    centre's slot."""
    b, n = keep.shape
    g = pool.shape[1] - x.shape[1]
    w = x.shape[1] // g
    slots = pool[:, : g * w].reshape(b * g, w)
    n_sel = pool[:, g * w :].reshape(b * g)
    valid = torch.arange(w, device=x.device)[None] < n_sel[:, None]
    clusters = n_sel // CLUSTER_EVERY + (n_sel > 0)
    merged, centre, ok = cluster_and_merge(x.view(b * g, w, -1).float(), valid, clusters)
    cw = centre.shape[1]
    at = slots.gather(1, centre)  # [B * G, C] slots of the centres
    batch = torch.arange(b * g, device=x.device)[:, None] // g  # each group's sample
    flat = torch.where(ok, batch * n + at, b * n).view(-1)
    host = torch.zeros(b, n + 1, dtype=torch.bool, device=x.device)
    host.scatter_(1, torch.where(ok, at, n).view(b, g * cw), True)
    return merged.reshape(b * g * cw, -1).to(x.dtype), flat, keep | host[:, :n]
