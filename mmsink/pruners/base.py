"""Pruner protocol, budget handling and the selection helpers every pruner shares."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..core.plan import Prefill

REGISTRY: dict[str, type[Pruner]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


class Pruner:
    """A pruner decides keep-sets; the Plan applies them. Subclasses set ``name``, an ``Options``
    dataclass and implement some of the hooks below. Per-forward state lives in ``ctx.run``."""

    name = ""
    uses_budget = True
    uses_grids = False  # reads ``layout.grids`` (families whose grids cost device reads build them then)
    default_budget: int | float | None = None
    plans_text = False  # also plans prompts without images (else a batch without images runs untouched)

    @dataclasses.dataclass
    class Options:
        pass

    per_prompt_ok = True  # whether the budget may apply to all images of a prompt together

    def __init__(self, budget=None, budget_per="image", **options):
        if budget_per not in ("image", "prompt"):
            raise ValueError(f"mmsink: budget_per must be 'image' or 'prompt', got {budget_per!r}")
        if budget_per == "prompt" and not self.per_prompt_ok:
            raise ValueError(
                f"mmsink: method {self.name!r} budgets each image on its own (budget_per='image')"
            )
        self.budget_per = budget_per
        names = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(
                f"mmsink: method {self.name!r} does not take option(s) {unknown}; "
                f"it takes: {sorted(names) or 'none'} (and 'budget')"
            )
        if budget is not None and not self.uses_budget:
            raise ValueError(f"mmsink: method {self.name!r} does not take a budget")
        self.budget = check_budget(budget if budget is not None else self.default_budget)
        self.options = self.Options(**options)
        self.check_options()

    def check_options(self) -> None:
        pass

    def check_model(self, num_layers: int) -> None:
        pass

    def check_with(self, var) -> None:
        """Refuse (one-line ValueError) sink settings this method cannot honour: ``var``, VAR's config."""

    # ---- hooks (all optional)
    def start(self, ctx: Prefill) -> None:
        ctx.run = {}

    def install(self, seam, family) -> list:
        """Hooks of the method's own on the model (e.g. on the family's projector); handles with
        ``remove()``. Called once per wrap; ``seam.prefill()`` is the running prefill."""
        return []

    def final_layer(self, ctx: Prefill) -> int | None:
        """The first layer from which the plan can no longer change (None: not known in advance). Layers
        from there on run on one segment, which ``generate_fast`` captures as one graph."""
        return None

    def settled(self, ctx: Prefill, layer: int) -> bool:
        """For pruners whose last decision is not known in advance (``final_layer`` None): True once the
        plan can no longer change from ``layer`` on (asked before each layer while it is False)."""
        return False

    def before_llm(self, ctx: Prefill, embeds: torch.Tensor) -> torch.Tensor | None:
        return None

    def directive(self, ctx: Prefill, layer: int) -> dict | None:
        """What layer ``layer``'s attention must provide: {"observe": True} and/or {"reweight": fn}."""
        return None

    def after_layer(self, ctx: Prefill, layer: int, hidden: torch.Tensor, observed: dict) -> None:
        pass

    def report(self, ctx: Prefill) -> dict:
        """What this method adds to ``stats(model).extra`` after a prefill (built when stats are read)."""
        return {}


class VisionPruner(Pruner):
    """A method that selects (and may merge) tokens in the vision stage, before the projector. The family
    hands it the tower's tokens (``mmsink.core.family.VisionTokens``: scores, keys, rows and the map to
    the sequence); the method implements ``select`` only. Adding one touches its own file and the
    registry, no family."""

    uses_vision = True
    per_prompt_ok = False  # budgets apply image by image

    def final_layer(self, ctx):
        return 0  # decided before the first layer

    def select(self, ctx: Prefill, tokens) -> tuple:
        """(new features [R, P, F], keep [R, P] bool). A method that knows on the host how many tokens each
        image keeps puts them in ``ctx.run["kept_images"]`` (images in input order): the plan then needs no
        device read to apply the keep set."""
        raise NotImplementedError

    def vision(self, ctx: Prefill, tokens):
        """The projector's new input; the keep set, in sequence order, waits for ``before_llm``."""
        features, keep = self.select(ctx, tokens)
        ctx.run["keep"] = tokens.to_sequence(keep)
        return tokens.put(features)

    def before_llm(self, ctx: Prefill, embeds):
        keep = ctx.run.pop("keep", None)  # every image's keep set, in the sequence's order of image tokens
        if keep is None:
            return None
        if ctx.vit_order is not None:  # ViT sinks were moved to the front of their image: the keep set too
            keep = keep[ctx.vit_order.to(keep.device)]
        kept, counts = ctx.run.pop("kept_images", None), None
        n_images = [len(s) for s in ctx.layout.sizes]
        if kept is not None and ctx.seg.counts is not None and len(kept) == sum(n_images):
            it = iter(kept)  # images in sequence order (a layout run of back-to-back images: no match)
            counts = [(t, [next(it) for _ in range(k)]) for (t, _), k in zip(ctx.seg.counts, n_images)]
        # the image tokens' places in order, without nonzero's read: a stable sort puts them first
        is_image = ctx.layout.is_image
        places = (~is_image).flatten().to(torch.uint8).argsort(stable=True)[: keep.numel()]
        chosen = torch.zeros_like(is_image).flatten().index_put_((places,), keep.flatten()).view_as(is_image)
        ctx.decide(ctx.keep_text(chosen), counts=counts)
        return None


def per_image(rows: list, parts: list) -> list:
    """Per-row counts summed over the rows of each image (``parts[i]``: rows of row i's image)."""
    out, i = [], 0
    while i < len(rows):
        out.append(sum(rows[i : i + parts[i]]))
        i += parts[i]
    return out


def check_budget(budget):
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"mmsink: budget must be an int (tokens kept) or a float in (0, 1], got {budget!r}")
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0):
            raise ValueError(f"mmsink: a fractional budget must lie in (0, 1], got {budget}")
    elif budget <= 0:
        raise ValueError(f"mmsink: budget must be > 0, got {budget}")
    return budget


def check_size(budget, sizes) -> None:
    """Refuse an int budget larger than an image (``sizes``: token counts, host ints)."""
    small = [n for n in sizes if 0 < n < budget] if isinstance(budget, int) else []
    if small:
        raise ValueError(f"mmsink: budget {budget} is larger than the image's {min(small)} visual tokens")


def budget_count(budget, n: torch.Tensor) -> torch.Tensor:
    """Tokens to keep of an image of ``n`` tokens ([B] long; 0 where there is no image), on the device and
    without reading it: the size check is the caller's, from host sizes (``topk_per_image`` makes it)."""
    if isinstance(budget, float):
        return torch.where(n > 0, torch.ceil(n.double() * budget).long().clamp(min=1), 0)
    return torch.where(n > 0, budget, 0)  # an int budget is >= 1


def budget_tokens(budget, n: int) -> int:
    """``budget_count`` for one image of ``n`` tokens known on the host, checked against its size."""
    check_size(budget, [n])
    if n == 0:
        return 0
    return max(1, math.ceil(n * budget)) if isinstance(budget, float) else budget


def budget_fraction(budget, n_image: int) -> float:
    if budget is None:
        return 1.0
    if isinstance(budget, float):
        return budget
    check_size(budget, [n_image])
    return budget / n_image


def budget_sizes(ctx: Prefill) -> list:
    """Per sample, the token counts the budget applies to: each image's, or the prompt's images together."""
    sizes = ctx.layout.sizes
    return sizes if ctx.budget_per != "prompt" else [[sum(s)] for s in sizes]


def topk_per_image(ctx: Prefill, scores: torch.Tensor, k_of, budget=None, memo: str | None = None):
    """Chosen visual slots [B, n]: for each image, the k highest ``scores`` among its current slots.
    ``k_of(orig_count [B], current_count [B]) -> k [B]``; ``budget``: an int budget to check against the
    image sizes. No device sync: a full sort per image instead of a top-k whose width is read back.
    ``memo``: a key of the segment's cache under which each image's candidates and k are kept for later
    calls on the same segment (when ``k_of`` depends on its arguments alone)."""
    check_size(budget, [n for s in budget_sizes(ctx) for n in s])
    images = ctx.seg.cache.get(memo) if memo is not None else None
    if images is None:
        images = image_candidates(ctx.image_of(), ctx.layout.counts, k_of, ctx.budget_per == "prompt")
        if memo is not None:
            ctx.seg.cache[memo] = images
    return pick_per_image(scores, images, ctx.visual())


def image_candidates(img, orig, k_of, per_prompt: bool) -> tuple:
    """Per image (per prompt with ``per_prompt``: its images compete for one budget), its candidate slots
    [B, n] and the first k of a sorted row [B, n], k = min(``k_of(orig_count [B], current_count [B])``,
    current count). ``img`` [B, n]: each slot's image (-1: none); ``orig`` [B, M]: the layout's counts.
    Device ops only (no read): CUDA-graph safe."""
    if per_prompt:
        img = torch.where(img >= 0, torch.zeros_like(img), img)
        orig = orig.sum(1, keepdim=True)
    ranks = torch.arange(img.shape[1], device=img.device)[None]
    images = []
    for m in range(orig.shape[1]):
        cand = img == m
        cur = cand.sum(1)
        k = torch.minimum(k_of(orig[:, m], cur), cur)
        images.append((cand, ranks < k[:, None]))
    return tuple(images)


def pick_per_image(scores, images, like) -> torch.Tensor:
    """The k highest ``scores`` among each image's candidates (``image_candidates``) -> [B, n] bool; none
    where there are no images (``like``: [B, n])."""
    chosen = None
    for cand, first in images:
        s = torch.where(cand, scores.float(), float("-inf"))
        order = s.argsort(dim=1, descending=True, stable=True)  # ties: lower slot first, as topk does here
        pick = cand.scatter(1, order, first)  # order lists every slot: each is written
        chosen = pick if chosen is None else chosen | pick
    return chosen if chosen is not None else torch.zeros_like(like, dtype=torch.bool)


def topk_counts(ctx: Prefill, k_host) -> list | None:
    """What each sample keeps after ``ctx.keep_text(topk_per_image(ctx, scores, k_of))``, as
    ``Segment.counts``, when the host can tell: the segment's counts are known and no tokens are
    protected. ``k_host(orig, cur) -> int`` is ``k_of`` on host ints (capped by ``cur`` here, as there)."""
    seg = ctx.seg
    if seg.counts is None or ctx.protected is not None or ctx.pending is not None:
        return None
    out = []
    for sizes, (text, vis) in zip(ctx.layout.sizes, seg.counts):
        if ctx.budget_per == "prompt":  # one group per prompt: the images' split is not known after it
            sizes, vis = ([sum(sizes)], [sum(vis)]) if vis else ([], [])
        out.append((text, [min(k_host(o, c), c) for o, c in zip(sizes, vis)]))
    return out


def anchor_probs(ctx: Prefill, observed: dict) -> torch.Tensor:
    """Post-softmax attention of the anchor query over the current slots [B, H, n] (fp32), from the q row
    and keys the attention call kept. Only this one row is computed."""
    q, k = observed["q"], observed["k"]
    b, h, n, d = k.shape[0], q.shape[1], k.shape[2], k.shape[3]
    ctx.extra_flops += 2 * b * h * n * d
    probs = anchor_softmax(q, k, ctx.in_prompt(), observed["scale"])
    edit = observed.get("edit_probs")  # e.g. VAR at this layer: rank by the attention actually used
    return edit(probs) if edit is not None else probs


def anchor_softmax(q, k, prompt, scale) -> torch.Tensor:
    """The anchor row's softmax over the ``prompt`` slots [B, H, n] (fp32) from ``q`` [B, H, d] and ``k``
    [B, Hkv, n, d]; device ops only (``anchor_probs``; VisiPruner's graphed step; PDrop's ``rank_and_pick``,
    with fp32 inputs)."""
    h, hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(h // hkv, dim=1) if h != hkv else k
    logits = torch.einsum("bhd,bhnd->bhn", q, kk).float() * scale
    return torch.softmax(torch.where(prompt[:, None], logits, float("-inf")), -1)


def segment_sum(values, seg, n: int) -> torch.Tensor:
    """[G, n, D]: per row, the sum of ``values`` [G, N, D] over each segment's tokens (``seg`` [G, N] in
    [0, n)). A one-hot matmul, not ``scatter_add_``: CUDA's atomic adds sum in a varying order, so the same
    inputs (eager or a graph's replay) could give other bits from run to run."""
    onehot = (seg[..., None] == torch.arange(n, device=seg.device)).to(values.dtype)
    return onehot.transpose(1, 2) @ values
