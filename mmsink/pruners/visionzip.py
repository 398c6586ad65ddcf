"""VisionZip (Yang et al., CVPR 2025): inside the vision tower, question-independent. Follows the official
code, dvlab-research/VisionZip (``visionzip/clip_encoder.py``: ``CLIPVisionTower_VisionZip.forward``;
``visionzip/utils.py``: the feature layer's keys, mean over heads; ``visionzip/main.py``: the tower is
given ``dominant - 1``).

Dominant tokens: [CLS] and the ``dominant - 1`` patches the [CLS] query attends to most in the layer whose
output feeds the projector (its attention row summed over heads in the official code; mmsink's scores are
the mean over heads, the same order). [CLS] reaches the LLM, as there. Contextual tokens: the remaining
patches, in order, compared by their keys (mean over heads, normalised); every ``max(1, n_rest //
contextual)``-th of them is a target (the first ``contextual``), each other one joins its most
cosine-similar target, and a contextual token is ``target + mean(its assigned tokens)`` (the target alone
when none joins), in the feature space the projector reads. Budget split as the paper (54+10 of 64,
108+20 of 128, 162+30 of 192): contextual = round(budget * 10 / 64); the budget counts [CLS].

Where mmsink knowingly differs: kept tokens keep their original positions (the official code puts [CLS]
first, then the dominant patches, then the contextual tokens, re-indexed); the sequence has one slot per
patch, so [CLS] takes the slot of its image's (tile's) first patch that is not kept (one always exists:
the budget counts [CLS]); a merged token sits at its target's slot. LLaVA-NeXT: per tile (each tile its
own [CLS]), the image's budget shared evenly by its tiles, only the tokens unpadding keeps compete, and
newline tokens are dropped (the official code gives every tile the full budget, selects on all its
patches and drops the newlines). Qwen2-VL / Qwen2.5-VL (no [CLS], no official code): dominant tokens are
the ``dominant`` tokens receiving the most attention in the last vision block (mean over heads and over the
queries of the image, the paper's rule for towers without [CLS]), per merged token (mean over its
patches). ViT sinks (``sink_forward``) are kept as themselves: never a target, never merged into one, and
never the slot [CLS] takes. Scores come from the projections the tower computes anyway (no attention
matrix is kept; the [CLS] row or chunks of query rows are recomputed and counted in the FLOPs). The
selection's device work (``zip_rows``) replays as one CUDA graph per input signature
(``core.graphs.Graphed``).
"""

from __future__ import annotations

import torch

from ..core import layout
from ..core.graphs import Graphed
from .base import VisionPruner, budget_tokens, per_image, register, segment_sum


class SinkAware(VisionPruner):
    """A vision-stage pruner that knows, when it selects, which tokens ViT-sink forwarding will protect,
    and whose keep set follows the sinks when ``to_front`` moves them to the front of their image."""

    def sinks(self, ctx):
        """Per image (sequence order), the ViT sinks forwarding protects (detected on the features the
        projector receives, before this pruner selects), or None when it is off."""
        return ctx.vit_sink_mask

    def protected_rows(self, ctx, tokens):
        """[R, P] bool: the tokens ViT-sink forwarding will protect, None when it is off. Protected tokens are
        kept as they are: a vision-stage pruner must not change their features."""
        sinks = self.sinks(ctx)
        if sinks is None:
            return None
        r, p = tokens.scores.shape
        dev = tokens.scores.device
        sink = torch.cat(sinks).to(dev)
        rows = tokens.to_sequence(torch.arange(1, r * p + 1, device=dev).view(r, p)) - 1  # -1: no row
        idx = torch.where(sink & (rows >= 0), rows, r * p)
        return torch.zeros(r * p + 1, dtype=torch.bool, device=dev).scatter_(0, idx, True)[: r * p].view(r, p)


def candidates(tokens) -> torch.Tensor:
    """[R, P] the patches a pruner chooses among: present ones, not a [CLS] held in slot 0."""
    r, p = tokens.scores.shape
    ok = torch.ones(r, p, dtype=torch.bool, device=tokens.scores.device)
    if tokens.present is not None:
        ok = ok & tokens.present
    if tokens.cls_in_row:
        ok[:, 0] = False
    return ok


def row_choices(ctx, tokens, budget) -> tuple:
    """(candidates [R, P], candidates per row, tokens each row keeps) for a method that keeps a subset of
    each row's patches; the kept count per image goes to ``ctx.run["kept_images"]`` (host counts)."""
    sizes = [n - 1 for n in tokens.sizes] if tokens.cls_in_row else list(tokens.sizes)
    ks = [min(row_budget(budget, n, m), n) for n, m in zip(sizes, tokens.parts)]
    ctx.run.setdefault("kept_images", []).extend(per_image(ks, tokens.parts))
    return candidates(tokens), sizes, ks


def row_budget(budget, p: int, parts: int = 1) -> int:
    """Tokens a row of ``p`` tokens keeps; ``parts``: an int budget is the image's, shared evenly by that
    many rows (LLaVA-NeXT tiles; each tile at least one); a fraction applies to each row."""
    if isinstance(budget, int) and parts > 1:
        total = max(1, round(budget / parts))
        if total > p:
            raise ValueError(f"mmsink: budget {budget} is larger than {parts} tiles of {p} tokens")
        return total
    return budget_tokens(budget, p)


def first_free(free: torch.Tensor):
    """(slot [R], found [R]): each row's first True of ``free`` (no device read)."""
    return free.to(torch.uint8).argmax(1), free.any(1)


@register
class VisionZip(SinkAware):
    name = "visionzip"
    default_budget = 64 / 576

    def split(self, p: int, parts: int = 1) -> tuple[int, int]:
        """(dominant, contextual) tokens kept of ``p`` tokens; ``parts``: an image's budget is shared evenly
        by that many tiles of ``p`` tokens each (LLaVA-NeXT). With a [CLS] token, dominant counts it."""
        total = row_budget(self.budget, p, parts)
        contextual = min(round(total * 10 / 64), max(total - 1, 0))
        return total - contextual, contextual

    def select(self, ctx, tokens):
        t = tokens
        present = t.present
        if t.cls_in_row:
            present = candidates(t)
        out = self.zip(
            ctx,
            t.features,
            t.scores,
            t.keys,
            t.parts,
            present,
            t.sizes if not t.cls_in_row else [n - 1 for n in t.sizes],
            cls=t.cls,
            protected=self.protected_rows(ctx, t),
            cls_in_row=t.cls_in_row,
        )
        contextual = ctx.run.pop("contextual", None)
        if contextual:
            count_merge(ctx, t, contextual)
        return out

    def check_options(self) -> None:
        super().check_options()
        # one CUDA graph per input signature, eager off CUDA; LLaVA-NeXT's tile counts and even / uneven
        # rows give a few signatures. Not ``reuse``: every prefill's inputs are new tensors (nothing to
        # skip), and a graphed tower's own outputs change under a replay without a version bump
        self.rows = Graphed(zip_rows, keep=6)

    def zip(
        self,
        ctx,
        features,
        score,
        metric,
        parts=None,
        present=None,
        sizes=None,
        cls=None,
        protected=None,
        cls_in_row=False,
    ):
        """features [I, P, F], score [I, P], metric [I, P, d] -> (merged features, keep [I, P]): per row the
        top dominant patches by score, then the rest merged around evenly spaced targets. ``present`` [I, P]:
        only these tokens compete (the others pass through untouched); ``parts`` [I]: how many tiles share
        each row's image budget; ``sizes``: present tokens per row (read from ``present`` if not given);
        ``cls`` [I, F]: the rows' [CLS] tokens (one dominant token each, written at the row's first free
        slot); ``cls_in_row``: slot 0 holds [CLS] (kept; not in ``present``); ``protected`` [I, P]: kept as
        they are, out of the merge. All rows at once (rows may differ in size and budget). The host's
        counts here, the device's work in ``zip_rows`` (``self.rows``: a CUDA graph on a GPU)."""
        n_img, p = score.shape
        if present is None:
            sizes = [p] * n_img
        elif sizes is None:
            sizes = present.sum(1).tolist()  # one read: budgets depend on each tile's size
        parts = parts if parts is not None else [1] * n_img
        with_cls = cls is not None or cls_in_row
        # the budget is over the image's tokens in the sequence: its patches (and a [CLS] held in a row)
        splits = [self.split(n + cls_in_row, m) for n, m in zip(sizes, parts)]
        # patches picked as dominant: [CLS] is one of the dominant tokens
        picks = [d - with_cls for d, _ in splits]
        steps = [max(1, (n - d) // c) if c else 1 for n, d, (_, c) in zip(sizes, picks, splits)]
        record_kept(ctx, sizes, splits, picks, steps, parts, protected is None)
        ctx_max = max(c for _, c in splits)
        if ctx_max:
            ctx.run["contextual"] = [c for _, c in splits]  # the merge's work is counted by the caller
            # protected tokens: the step is counted on the device, from each row's unprotected rest
            spacing = steps if protected is None else [max(c, 1) for _, c in splits]
            pick, contextual, spacing = per_rows([picks, ctx.run["contextual"], spacing], features.device)
        else:
            (pick,), contextual, spacing = per_rows([picks], features.device), 0, 1
        return self.rows(
            features,
            score,
            metric,
            present,
            protected,
            cls,
            pick,
            max(picks),
            contextual,
            ctx_max,
            spacing,
            cls_in_row,
        )


def zip_rows(
    features,
    score,
    metric,
    present,
    protected,
    cls,
    picks,
    most: int,
    contextual,
    ctx_max: int,
    spacing,
    cls_in_row: bool,
):
    """``VisionZip.zip``'s device work -> (merged features, keep [I, P]); writes none of its inputs. Per row
    (a number when every row agrees, else a column [I, 1]): ``picks`` dominant patches (``most`` the
    largest), ``contextual`` targets (``ctx_max`` the most); ``spacing``: the step between targets, or with
    ``protected`` the count the unprotected rest is divided by for it. ``present``, ``protected``, ``cls``:
    None when absent. Tensors and plain values in, no host reads or host-built tensors: ``Graphed``
    replays it as one CUDA graph."""
    n_img, p = score.shape
    dev = features.device
    ok = torch.ones(n_img, p, dtype=torch.bool, device=dev) if present is None else present
    keep = top_rows(score, ok, picks, most)
    out = features.clone()
    rest = ok & ~keep
    if protected is not None:
        rest = rest & ~protected
    target = torch.zeros_like(keep)
    if ctx_max:
        step = spacing if protected is None else (rest.sum(1, keepdim=True) // spacing).clamp(min=1)
        target = merge(out, features, metric, rest, contextual, step, ctx_max)
    keep = keep | target
    if cls is not None:  # [CLS] at the first slot no other token holds
        free = ok & ~keep if protected is None else ok & ~keep & ~protected
        slot, found = first_free(free)
        rows = torch.arange(n_img, device=dev)
        old = out[rows, slot]
        out[rows, slot] = torch.where(found[:, None], cls.to(out.dtype), old)
        keep = keep | (torch.zeros_like(keep).scatter_(1, slot[:, None], found[:, None]))
    if cls_in_row:
        keep[:, 0] = True
    return out, keep


def merge(out, features, metric, rest, contextual, step, ctx_max):
    """Contextual tokens: of ``rest`` [I, P] in order, every step-th (the first ``contextual``) is a
    target; each other one joins its most similar target (cosine of keys); the target's features in
    ``out`` become ``target + mean(joined)``. Returns the targets [I, P]."""
    n_img, p = rest.shape
    dev = features.device
    metric = torch.nn.functional.normalize(metric.float(), dim=-1)
    rank = rest.long().cumsum(1) - 1
    target = rest & (rank % step == 0) & (rank // step < contextual)
    others = rest & ~target
    slot = torch.where(target, rank // step, ctx_max)  # a target's column; the rest write a spare one
    cols = torch.full((n_img, ctx_max + 1), p, dtype=torch.long, device=dev)
    cols.scatter_(1, slot, torch.arange(p, device=dev).expand(n_img, -1))
    cols = cols[:, :ctx_max]  # target positions [I, C]; p where a row has fewer targets
    real = cols < p
    pad = torch.nn.functional.pad
    mt = pad(metric, (0, 0, 0, 1)).gather(1, cols[..., None].expand(-1, -1, metric.shape[-1]))
    sim = torch.einsum("ipd,icd->ipc", metric, mt).masked_fill(~real[:, None], float("-inf"))
    assign = sim.argmax(-1)  # [I, P] the target each token would join
    f = pad(features.float(), (0, 0, 0, 1))
    width = f.shape[-1]
    joined = segment_sum(f[:, :p] * others[..., None], assign, ctx_max)
    counts = torch.zeros(n_img, ctx_max, device=dev).scatter_add_(1, assign, others.float())
    merged = f.gather(1, cols[..., None].expand(-1, -1, width)) + joined / counts.clamp(min=1)[..., None]
    res = pad(out, (0, 0, 0, 1)).scatter_(1, cols[..., None].expand(-1, -1, width), merged.to(out.dtype))
    out.copy_(res[:, :p])
    return target


def count_merge(ctx, tokens, contextual: list) -> None:
    """The merge's FLOPs (every row's tokens against ``max(contextual)`` targets): the batch's as run, and
    each sample's as it would run alone, its rows only, as wide as its widest row (every family's widest
    row of a sample is full: a CLIP tile, or Qwen's largest image) against its own most targets."""
    r, p = tokens.scores.shape
    d = tokens.keys.shape[-1]
    sample, first = [], 0
    for sizes in ctx.layout.sizes:  # rows are the images' tiles, in sequence order
        rows, images = first, len(sizes)
        while images:
            images, rows = images - 1, rows + tokens.parts[rows]
        own = range(first, rows)
        width = max((tokens.sizes[i] for i in own), default=0)
        sample.append(2 * len(own) * width * max((contextual[i] for i in own), default=0) * d)
        first = rows
    ctx.add_flops(2 * r * p * max(contextual) * d, sample)


def per_rows(lists: list, dev) -> list:
    """Each list of per-row values as a number when every row agrees (a plain value in a graph's key, no
    copy), else a column [I, 1] on ``dev``; the columns sent in one asynchronous copy (``layout.upload``:
    no wait for the queued work, as ``torch.tensor(list, device=...)`` would)."""
    uneven = [x for x in lists if len(set(x)) > 1]
    cols = iter(layout.upload([torch.tensor(uneven)], dev)[0] if uneven else ())
    return [x[0] if len(set(x)) == 1 else next(cols).view(-1, 1) for x in lists]


def top_rows(score: torch.Tensor, ok: torch.Tensor, picks, most: int) -> torch.Tensor:
    """[I, P] keep: per row its ``picks`` highest scores among ``ok`` (a number, or a column [I, 1]; ``most``
    the largest; no read)."""
    n_img, p = score.shape
    dev = score.device
    keep = torch.zeros(n_img, p, dtype=torch.bool, device=dev)
    if most <= 0:
        return keep
    top = score.float().masked_fill(~ok, float("-inf")).topk(most, dim=1).indices
    keep.scatter_(1, top, (torch.arange(most, device=dev)[None] < picks).expand(n_img, -1))
    return keep


def record_kept(ctx, sizes, splits, picks, steps, parts, known=True) -> None:
    """Tokens each image keeps, on the host, appended to ``ctx.run["kept_images"]`` (None once unknown):
    per row its dominant tokens ([CLS] included) and its targets (every step-th of the rest, at most
    ``contextual``), the rows of an image (its tiles) summed. Unknown when a row has fewer tokens than
    dominant picks, or when tokens are protected (the plan then counts on the device)."""
    if "kept_images" in ctx.run and ctx.run["kept_images"] is None:
        return
    if not known or any(n < d for n, d in zip(sizes, picks)):
        ctx.run["kept_images"] = None
        return
    rows = [
        d + (min(c, -(-(n - k) // st)) if c else 0) for n, (d, c), k, st in zip(sizes, splits, picks, steps)
    ]
    ctx.run.setdefault("kept_images", []).extend(per_image(rows, parts))
