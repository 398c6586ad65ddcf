"""The token plan: which tokens each decoder layer processes, applied between layers.

A prefill walks the layers with a current *segment*: the original sequence indices of the tokens that
are alive (per sample, sorted, padding on the left) and which slots are real. A pruner decision after
layer l (a keep mask over the current slots) starts a new segment at layer l+1: hidden states, rotary
embeddings and the mask are gathered to the kept slots. Every pruner uses this one mechanism.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .attention import build_mask
from .layout import Layout


@dataclass(frozen=True)
class LMParts:
    """What a pruner may use of the language model besides the hidden states it is handed: the decoder
    layers (their norms and projections, e.g. to score with the next layer's own queries), the final norm
    and the family's rotary function ``rope(q, k, cos, sin) -> (q, k)``."""

    layers: list
    norm: torch.nn.Module
    rope: Callable


@dataclass
class Segment:
    start: int  # first layer that runs on it
    idx: torch.Tensor  # [B, n] original sequence index per slot (0 on padding)
    valid: torch.Tensor  # [B, n] bool
    full: bool  # the untouched full sequence: transformers' own mask and positions apply
    gather: torch.Tensor | None = None  # [B, n] slots of the previous segment this one takes
    cache: dict = field(default_factory=dict)
    dense: bool = False  # every slot is a real token (no padding): plain causal attention is exact
    total: int | None = None  # real tokens over the batch (host int, read with the widths)
    counts: list | None = None  # per sample (text tokens, [visual tokens per image, or all as one]) if known

    @property
    def n(self) -> int:
        return self.idx.shape[1]

    def mask(self, base: str, dtype) -> torch.Tensor | None:
        """The attention mask of this segment's layers. None when dense and the backend is causal by
        itself (SDPA's is_causal, flash): an explicit mask would keep SDPA off its flash kernel."""
        if self.dense and base != "eager":
            return None
        key = ("mask", base, dtype)
        if key not in self.cache:
            self.cache[key] = build_mask(base, self.valid, self.n, dtype)
        return self.cache[key]

    def position_embeddings(self, full_pe):
        if "pe" not in self.cache:
            cos, sin = (t.to(self.idx.device) for t in full_pe)  # rotary tables live with the embeddings
            self.cache["pe"] = (gather_rows(cos, self.idx), gather_rows(sin, self.idx))
        return self.cache["pe"]


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B|1, L, ...] -> [B, n, ...] rows idx (per sample)."""
    b = idx.shape[0]
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    shape = (b, idx.shape[1]) + (1,) * (x.dim() - 2)
    return x.gather(1, idx.view(shape).expand(-1, -1, *x.shape[2:]))


def repack(seg: Segment, keep: torch.Tensor, start: int, widths: tuple | None = None) -> Segment:
    """New segment with the kept slots of ``seg`` (keep [B, n] bool), left-padded and in order.
    ``widths``: the fewest and most slots a sample keeps and their total, when the caller knows them."""
    keep = keep & seg.valid
    n = seg.n
    if widths is None:  # one read: the new width, whether it is dense, the total
        c = keep.sum(1)
        widths = torch.stack([c.min(), c.max(), c.sum()]).tolist()
    lo, hi, total = widths
    n_new = max(hi, 1)
    ar = torch.arange(n, device=keep.device)
    order = torch.where(keep, n + ar, ar).argsort(dim=1)[:, n - n_new :]
    dense = lo == hi == n_new
    valid = keep.gather(1, order)
    return Segment(start, seg.idx.gather(1, order), valid, False, gather=order, dense=dense, total=total)


class Prefill:
    """Per-forward state of one prefill (held by the model's handle for the duration of the call)."""

    def __init__(self, layout: Layout, num_layers: int, base: str):
        self.layout = layout
        self.num_layers = num_layers
        self.base = base
        b, l = layout.is_image.shape
        self.home = layout.is_image.device  # where the call started (layers may sit on other devices)
        self.device = self.home  # where the plan's tensors are now
        idx = torch.arange(l, device=self.home).expand(b, l)
        host = [(n - sum(s), list(s)) for n, s in zip(layout.lengths, layout.sizes)]
        total = sum(layout.lengths)
        full = Segment(0, idx, layout.valid.clone(), True, dense=layout.dense, total=total, counts=host)
        self.segments = [full]
        self.layer_segment: list[int] = []
        self.pending: torch.Tensor | None = None  # keep mask decided for the next layer
        self.pending_counts: list | None = None  # what it keeps, as Segment.counts, when the host knows
        self.to_read: dict = {}  # device scalars a pruner needs on the host before the next layer
        self.host: dict = {}  # their values, read with the next layer's plan (one read for all)
        self.embed_override: torch.Tensor | None = None  # [B, L, d] replacement embeddings (pre-LLM)
        self.extra_flops = 0
        self.attn_flops: dict[int, int] = {}
        self.run = None  # the pruner's per-forward state
        self.slots: list[int] = []  # padded token slots each layer ran on
        self.directive = None  # the current layer's attention directive
        self.cache = None  # the PlanCache being filled, if caching
        self.protected: torch.Tensor | None = None  # [B, L] tokens no pruner may drop (ViT sinks)
        self.budget_per = "image"  # or "prompt": one budget shared by a prompt's images
        self.lm: LMParts | None = None  # the language model's parts (set by the handle)
        self.position_embeddings = None  # the full sequence's rotary (cos, sin), set before layer 0

    def current_position_embeddings(self):
        """The rotary (cos, sin) rows of the current segment's slots."""
        return self.seg.position_embeddings(self.position_embeddings)

    # ---- views of the current segment
    @property
    def seg(self) -> Segment:
        return self.segments[-1]

    # computed once per segment (its layers and the pruner's calls share them); never edit them in place
    def visual(self, seg: Segment | None = None) -> torch.Tensor:
        seg = seg or self.seg
        if "visual" not in seg.cache:
            seg.cache["visual"] = gather_rows(self.layout.is_image, seg.idx) & seg.valid
        return seg.cache["visual"]

    def image_of(self, seg: Segment | None = None) -> torch.Tensor:
        seg = seg or self.seg
        if "image_of" not in seg.cache:
            io = gather_rows(self.layout.image_of, seg.idx)
            seg.cache["image_of"] = torch.where(seg.valid, io, torch.full_like(io, -1))
        return seg.cache["image_of"]

    def anchor_slot(self, seg: Segment | None = None) -> torch.Tensor:
        seg = seg or self.seg
        if "anchor" not in seg.cache:
            hit = (seg.idx == self.layout.anchor[:, None]) & seg.valid
            seg.cache["anchor"] = hit.float().argmax(1)
        return seg.cache["anchor"]

    def in_prompt(self, seg: Segment | None = None) -> torch.Tensor:
        """[B, n] real slots up to the anchor (the prompt's last token)."""
        seg = seg or self.seg
        if "in_prompt" not in seg.cache:
            slot = torch.arange(seg.n, device=seg.idx.device)
            seg.cache["in_prompt"] = (slot[None] <= self.anchor_slot(seg)[:, None]) & seg.valid
        return seg.cache["in_prompt"]

    def text_after_image_width(self) -> int | None:
        """The most text slots after a sample's first visual slot in the current segment, from host facts
        (text tokens are never dropped, so those after the first image are the sample's text minus the
        text before it); an upper bound if a sample's first image kept nothing. None when unknown."""
        lay, seg = self.layout, self.seg
        if seg.counts is None:
            return None
        pad = [lay.length - n for n in lay.lengths]
        per = [t - (f - p) if f < lay.length else 0 for (t, _), f, p in zip(seg.counts, lay.first_image, pad)]
        return max(per, default=0)

    def keep_text(self, chosen_visual: torch.Tensor) -> torch.Tensor:
        """Keep mask over current slots: every real text token plus the chosen visual ones."""
        vis = self.visual()
        return self.seg.valid & (~vis | chosen_visual)

    def decide(self, keep: torch.Tensor, counts: list | None = None) -> None:
        """Keep mask for the next layer. ``counts``: what each sample keeps, as ``Segment.counts``, when the
        pruner knows it on the host; the plan then needs no read to apply it."""
        if self.protected is not None:
            keep = keep | (gather_rows(self.protected, self.seg.idx) & self.seg.valid)
            counts = None
        if self.pending is not None:
            counts = None
        self.pending = keep if self.pending is None else (self.pending & keep)
        self.pending_counts = counts

    def advance(self, layer: int, hidden: torch.Tensor):
        """Called before ``layer``: apply a pending decision. Returns the (possibly gathered) hidden."""
        names, extra = list(self.to_read), [t.long() for t in self.to_read.values()]
        self.to_read = {}
        if self.pending is not None:
            keep, valid = self.pending & self.seg.valid, self.seg.valid
            known = self.pending_counts
            if known is not None and not extra:  # no read
                per = [t + sum(v) for t, v in known]
                (lo, hi, total), vals = (min(per), max(per), sum(per)), []
                same = total == self.seg.total
            else:  # one read: the new widths, whether anything goes, and the extras
                counts = keep.sum(1)
                same = (keep == valid).all()
                read = torch.stack([counts.min(), counts.max(), counts.sum(), same.long(), *extra]).tolist()
                (lo, hi, total, same), vals = read[:4], read[4:]
            self.pending = None
            if not same:
                new = repack(self.seg, keep, layer, (lo, hi, total))
                new.counts = known
                hidden = gather_rows(hidden, new.gather)
                self.segments.append(new)
        elif extra:
            vals = torch.stack(extra).tolist()
        if extra:
            self.host.update(zip(names, vals))
        self.layer_segment.append(len(self.segments) - 1)
        return hidden

    # ---- layers on several devices (device_map="auto")
    def to(self, device) -> None:
        """Move every tensor of this plan to ``device`` in place (not the cache or the call's kwargs): the
        plan follows the hidden states from one device's layers to the next."""
        device = torch.device(device)
        if device != self.device:
            _move(self, device, set(), skip=("cache", "kwargs", "home", "device"))
            self.device = device

    # ---- results
    def visual_per_layer(self) -> list[torch.Tensor]:
        counts = [self.visual(s).sum(1) for s in self.segments]
        return [counts[s] for s in self.layer_segment]


def _move(x, device, seen, skip=()):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, list):
        x[:] = [_move(v, device, seen) for v in x]
    elif isinstance(x, tuple):
        return tuple(_move(v, device, seen) for v in x)
    elif isinstance(x, dict):
        for k in list(x):
            x[k] = _move(x[k], device, seen)
    elif type(x).__module__.startswith("mmsink") and hasattr(x, "__dict__") and id(x) not in seen:
        seen.add(id(x))  # objects shared between fields (segments) are moved once, in place
        for k, v in vars(x).items():
            if k not in skip:
                object.__setattr__(x, k, _move(v, device, seen))
    return x


def layer_device(module, weight=None) -> torch.device | None:
    """Where a decoder layer computes: accelerate's execution device when dispatched, else its weights'
    (``weight``: one of its parameters, looked up once; ``module.to`` moves it in place)."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is None:
        p = weight if weight is not None else next(module.parameters(), None)
        return None if p is None else p.device
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
