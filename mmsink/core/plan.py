"""The token plan: which tokens each decoder layer processes, applied between layers.

A prefill walks the layers with a current *segment*: the original sequence indices of the tokens that
are alive (per sample, sorted, padding on the left) and which slots are real. A pruner decision after
layer l (a keep mask over the current slots) starts a new segment at layer l+1: hidden states, rotary
embeddings and the mask are gathered to the kept slots. Every pruner uses this one mechanism.

A layer may also run on a *selection* of its segment's slots (``Prefill.select``): the others skip it,
carrying their input state, and are back for the next layer (OrthoRank's per-layer form). The layer's
keys and values still span the whole segment; that segment, not the selection, is the layer's in the
cache's plan. The monotone path above never enters this code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

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
    masked: bool = False  # the previous segment's slots, some masked (``Prefill.decide(masked=True)``)

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


@dataclass
class Carry:
    """A layer running on a selection of segment ``base``'s slots: the rest skip it (``Prefill.select``)."""

    base: int  # index of the segment whose slots the layer's keys and values span
    hidden: torch.Tensor  # [B, n, D] the states entering the layer on every slot of that segment
    rest: Segment  # the slots that skip the layer; ``rest.gather``: their slots in the base segment


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


@dataclass(eq=False)
class Prefill:
    """Per-forward state of one prefill (held by the model's handle for the duration of the call). Every
    field is declared here; a pruner keeps its own per-forward state in ``run``."""

    layout: Layout
    num_layers: int
    base: str  # the attention backend under mmsink's entry ("sdpa", "eager", "flash_attention_2", ...)
    budget_per: str = "image"  # or "prompt": one budget shared by a prompt's images
    lm: LMParts | None = None  # the language model's parts a pruner may use
    kwargs: dict | None = None  # the model call's arguments (families read pixel values, grids)
    cache: object | None = None  # the PlanCache being filled, if caching
    handoff: bool = False  # generate_fast asked to stop the forward where the plan is final
    local_positions: bool = False  # each sample's first real token is at position 0 (generate_fast's)
    final_layer: int | None = None  # that layer when the pruner knows it in advance
    segments: list = field(init=False)
    layer_segment: list = field(default_factory=list)  # per layer run so far: its segment
    slots: list = field(default_factory=list)  # padded token slots each layer ran on
    pending: torch.Tensor | None = None  # keep mask decided for the next layer
    pending_counts: list | None = None  # what it keeps, as Segment.counts, when the host knows
    pending_masked: bool = False  # apply ``pending`` as a mask at the same width (no read; see decide)
    masked_open: list = field(default_factory=list)  # (masked segment, the one it masks) since the last read
    pending_hidden: torch.Tensor | None = None  # [B, n, D] states replacing the layer's output (merges)
    pending_rows: tuple | None = None  # (rows [B, n], per-sample counts) the next layer alone updates
    carry: Carry | None = None  # the running layer's skipped slots, while it runs on a selection
    to_read: dict = field(default_factory=dict)  # device scalars a pruner needs on the host next layer
    host: dict = field(default_factory=dict)  # their values, read with the next layer's plan
    extra_flops: float = 0  # selection work outside the layers (scores, merges), the batch's total
    own_flops: list = field(default_factory=list)  # of it, per sample ([B] host floats or device tensor
    # parts, summed when stats are asked for): what each sample alone would execute (see add_flops)
    owned_flops: float = 0  # the part of extra_flops those per-sample parts account for
    attn_flops: dict = field(default_factory=dict)  # layer -> attention FLOPs when not the plain count
    run: dict | None = None  # the pruner's per-forward state
    directive: object | None = None  # the current layer's attention directive
    position_embeddings: tuple | None = None  # the full sequence's rotary (cos, sin), set before layer 0
    protected: torch.Tensor | None = None  # [B, L] tokens no pruner may drop (ViT sinks)
    vit: list | None = None  # per image, the norms of its vision features (sink forwarding)
    vit_sink_mask: list | None = None  # per image, which of its tokens are ViT sinks (bool [tokens])
    vit_order: torch.Tensor | None = None  # to_front: image token i now holds what token vit_order[i] held
    vit_sinks: list | None = None  # per sample, the ViT sinks found (position, patch, norm)
    var_codes: dict = field(default_factory=dict)  # VAR: layer -> key group codes [B, n]
    taps: dict = field(default_factory=dict)  # what the vision tower's tapped modules gave this prefill
    home: torch.device = field(init=False)  # where the call started (layers may sit on other devices)
    device: torch.device = field(init=False)  # where the plan's tensors are now

    def __post_init__(self):
        lay = self.layout
        b, l = lay.is_image.shape
        self.home = self.device = lay.is_image.device
        idx = torch.arange(l, device=self.home).expand(b, l)
        host = [(n - sum(s), list(s)) for n, s in zip(lay.lengths, lay.sizes)]
        full = Segment(0, idx, lay.valid.clone(), True, dense=lay.dense, total=sum(lay.lengths), counts=host)
        self.segments = [full]

    def current_position_embeddings(self):
        """The rotary (cos, sin) rows of the current segment's slots."""
        return self.seg.position_embeddings(self.position_embeddings)

    def add_flops(self, total: float, per_sample=None) -> None:
        """Selection work: ``total`` as executed over the batch (padding included). ``per_sample``: what each
        sample would execute alone ([B] host floats, or a [B] device tensor read only when stats are
        asked for); without it stats share ``total`` out by tokens (exact for work linear in them)."""
        self.extra_flops += total
        if per_sample is not None:
            self.own_flops.append(per_sample)
            self.owned_flops += total

    def real_tokens(self, seg: Segment | None = None):
        """Per sample, its real slots in ``seg`` (the current one): host ints from the segment's counts
        when known, else a [B] device tensor (no read)."""
        seg = seg or self.seg
        return seg.valid.sum(1) if seg.counts is None else [t + sum(v) for t, v in seg.counts]

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
        return torch.where(self.visual(), chosen_visual, self.seg.valid)  # visual slots are real ones

    def decide(
        self, keep: torch.Tensor, counts: list | None = None, hidden: torch.Tensor | None = None, masked=False
    ):
        """Keep mask for the next layer. ``counts``: what each sample keeps, as ``Segment.counts``, when the
        pruner knows it on the host; the plan then needs no read to apply it. ``hidden``: [B, n, D] states
        of the current slots that replace the layer's output before the kept slots are gathered (a pruner
        that writes new tokens, e.g. merged ones, into slots it keeps; they keep those slots' positions).
        ``masked``: the next segment keeps this one's slots and masks the dropped ones (no read, so the host
        need not wait for the layer); a later unmasked decision gathers the kept slots (one read)."""
        self.pending_masked = masked if self.pending is None else (self.pending_masked and masked)
        if hidden is not None:
            self.pending_hidden = hidden
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
        if self.carry is not None:
            hidden = self.rejoin(hidden)
        if self.pending_hidden is not None:
            hidden, self.pending_hidden = self.pending_hidden.to(hidden.device, hidden.dtype), None
        if self.pending is not None and self.pending_masked:  # same slots, the dropped ones masked: no read
            keep, seg, self.pending = self.pending & self.seg.valid, self.seg, None
            new = Segment(layer, seg.idx, keep, False, dense=False, masked=True)
            if "pe" in seg.cache:
                new.cache["pe"] = seg.cache["pe"]  # positions are the slots': unchanged
            self.segments.append(new)
            self.masked_open.append((len(self.segments) - 1, len(self.segments) - 2))
            if extra:
                vals = torch.stack(extra).tolist()
        elif self.pending is not None:
            keep, valid = self.pending & self.seg.valid, self.seg.valid
            known = self.pending_counts
            if known is not None and not extra and not self.masked_open:  # no read
                per = [t + sum(v) for t, v in known]
                (lo, hi, total), vals = (min(per), max(per), sum(per)), []
                same = total == self.seg.total
            else:  # one read: the new widths, whether anything goes, the extras, which masks dropped nothing
                counts = keep.sum(1)
                # keep is within valid: all of it stays when the total is the segment's, if that is known
                same = [] if self.seg.total is not None else [(keep == valid).all().long()]
                opened, self.masked_open = self.masked_open, []
                kept_all = [(self.segments[j].valid == self.segments[p].valid).all() for j, p in opened]
                read = torch.stack([*torch.aminmax(counts), counts.sum(), *same, *extra, *kept_all]).tolist()
                at = 3 + len(same)
                (lo, hi, total), vals = read[:3], read[at : at + len(extra)]
                same = read[3] if same else total == self.seg.total
                self.unmask(opened, read[at + len(extra) :])
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
        if self.pending_rows is not None:
            return self.split(layer, hidden)
        self.layer_segment.append(len(self.segments) - 1)
        return hidden

    def unmask(self, opened: list, kept_all: list) -> None:
        """Layers on a masked segment that dropped nothing run on the segment it masks, as far as the cache
        and stats are concerned (the same slots and validity; a full one keeps transformers' own mask)."""
        alias = {}
        for (j, p), same in zip(opened, kept_all):
            if same:
                alias[j] = alias.get(p, p)
        if alias:
            self.layer_segment = [alias.get(s, s) for s in self.layer_segment]

    # ---- layers that update a selection of the tokens (the others skip them and come back)
    def select(self, rows: torch.Tensor, per_sample: list | None = None) -> None:
        """Only ``rows`` ([B, n] bool over the current slots) run the next layer; the other real slots skip
        it with their state unchanged and are back for the layer after. The layer's attention must still
        give the skipped slots' keys and values (the caller's directive: ``carry`` holds their states).
        ``per_sample``: each sample's selected real slots, when the host knows them (then no read)."""
        self.pending_rows = (rows, per_sample)

    def split(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Start ``layer`` on the selected slots: the segment they form becomes current, the states of
        every slot wait in ``carry``, and the layer's keys and values span the segment it came from."""
        (rows, per), self.pending_rows = self.pending_rows, None
        base = self.seg
        if base.start == layer and base.gather is not None:  # a keep decision was applied before this layer
            raise ValueError("mmsink: a layer cannot both drop tokens and run on a selection")
        rows = rows & base.valid
        real = self.real_tokens(base)
        known = per is not None and isinstance(real, list)
        rest = [r - k for r, k in zip(real, per)] if known else None
        sub = repack(base, rows, layer, (min(per), max(per), sum(per)) if known else None)
        skip = repack(base, base.valid & ~rows, layer, (min(rest), max(rest), sum(rest)) if known else None)
        self.carry = Carry(len(self.segments) - 1, hidden, skip)
        self.layer_segment.append(len(self.segments) - 1)
        self.segments.append(sub)
        return gather_rows(hidden, sub.gather)

    def rejoin(self, hidden: torch.Tensor) -> torch.Tensor:
        """The states of every slot of the segment a layer ran a selection of: its output on the selected
        slots, the input state elsewhere; that segment is current again. (Before the next layer, or
        before the final norm when the last layer ran a selection.)"""
        carry, self.carry, sub = self.carry, None, self.seg
        h_in = carry.hidden.to(hidden.device, hidden.dtype)
        n = h_in.shape[1]
        at = torch.where(sub.valid, sub.gather, n).to(hidden.device)  # padding rows go to a cut column
        out = torch.cat([h_in, h_in[:, :1]], 1).scatter(1, at[..., None].expand_as(hidden), hidden)
        base = self.segments[carry.base]
        self.segments.append(replace(base, start=len(self.layer_segment), gather=None))
        return out[:, :n]

    # ---- layers on several devices (device_map="auto")
    def to(self, device) -> None:
        """Move every tensor of this plan to ``device`` in place (not the cache or the call's kwargs): the
        plan follows the hidden states from one device's layers to the next."""
        device = torch.device(device)
        if device != self.device:
            _move(self, device, set(), skip=("cache", "kwargs", "home", "device"))
            self.device = device


class Decode:
    """Per-forward state of a cached decode step: masks per segment of the PlanCache."""

    def __init__(self, cache, base: str, n_q: int):
        self.cache, self.base, self.n_q = cache, base, n_q
        self.masks: dict = {}

    @classmethod
    def start(cls, cache, base: str, ids, kwargs) -> Decode:
        """Record the step's new tokens in the cache's segments (their validity from the attention mask)."""
        n_q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        am = kwargs.get("attention_mask")
        new = am[:, -n_q:].bool() if am is not None and am.dim() == 2 else None
        if new is None:
            dev = cache.segment_valid[0].device
            new = torch.ones(cache.segment_valid[0].shape[0], n_q, dtype=torch.bool, device=dev)
        cache.append_tokens(new)
        return cls(cache, base, n_q)

    def mask(self, layer: int, dtype):
        """(replace?, mask) for a layer: full segments keep transformers' own mask."""
        seg = self.cache.layer_segment[layer]
        if self.cache.segment_full[seg]:
            return False, None
        if seg not in self.masks:
            self.masks[seg] = build_mask(self.base, self.cache.segment_valid[seg], self.n_q, dtype)
        return True, self.masks[seg]


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
