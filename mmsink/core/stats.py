"""What the last prefill did (a batch prefilled in row chunks: all its chunks, merged)."""

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
    # padded slots each layer ran on (a batch prefilled in row chunks: the widest chunk's; see ``merge``)
    tokens_per_layer: list[int] = field(default_factory=list)
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


# ---- a batch prefilled in row chunks (generate_fast's prefill_batch): each chunk's stats, merged

# extra entries with one value per sample, as paths through nested dicts ("*": any key, e.g. a layer),
# and what a chunk without the entry (one run untouched: a text-only chunk of a pruned batch) gives its
# rows: the value a prompt without images gets in a whole batch where that is known, else None
PER_SAMPLE = {
    ("sample_prefill_flops",): None,
    ("sample_baseline_prefill_flops",): None,
    ("vit_sinks",): [],  # no image: no ViT sink
    ("fusion_layer",): -1,  # VisiPruner: no image, never fused
    ("schedule", "tokens"): [],  # SparseVLM: k per image, none without one
    ("var_sinks", "*", "visual"): None,  # VAR leaves an untouched chunk unedited: no counts
    ("var_sinks", "*", "text"): None,
    ("orthorank", "updated", "*"): None,
    ("orthorank", "held", "*"): None,
    ("orthorank", "updated_indices", "*"): None,
    ("orthorank", "updated_visual", "*"): None,
}
# extra entries about the whole batch: the pruner's options, or what it derived from the batch's images
BATCH_WIDE = {
    ("schedule", "layers"),  # PDrop: from the largest image (each chunk's own); SparseVLM: the model's
    ("schedule", "ratio"),
    ("schedule", "recycle"),
    ("orthorank", "layer"),
    ("orthorank", "sink"),
    ("orthorank", "form"),
}


def match(path: tuple, pattern: tuple) -> bool:
    return len(path) == len(pattern) and all(p == "*" or p == k for k, p in zip(path, pattern))


def kind_of(path: tuple):
    """("sample", fill) for a per-sample entry, ("batch",) for a batch-wide one, ("dict",) for a dict
    holding either deeper, None for an entry this merge does not know."""
    for pattern, fill in PER_SAMPLE.items():
        if match(path, pattern):
            return ("sample", fill)
    if path in BATCH_WIDE:
        return ("batch",)
    if any(len(p) > len(path) and match(path, p[: len(path)]) for p in [*PER_SAMPLE, *BATCH_WIDE]):
        return ("dict",)
    return None


def fills(fill, n: int) -> list:
    return [list(fill) if isinstance(fill, list) else fill for _ in range(n)]  # (no list shared by rows)


def merge_extra(extras: list, sizes: list, path: tuple = ()) -> tuple[dict, list]:
    """(merged, per chunk: what stays the chunk's own) of the chunks' ``extra`` dicts (None: a chunk
    without the dict at ``path``) of ``sizes`` rows each."""
    merged, own = {}, [{} for _ in extras]
    keys = list(dict.fromkeys(k for e in extras if e is not None for k in e))
    for key in keys:
        values = [e.get(key) if e is not None else None for e in extras]
        have = [e is not None and key in e for e in extras]
        kind = kind_of((*path, key))
        if kind is not None and kind[0] == "sample":
            fill = kind[1]
            merged[key] = [x for v, h, n in zip(values, have, sizes) for x in (v if h else fills(fill, n))]
        elif kind == ("dict",) and all(isinstance(v, dict) for v, h in zip(values, have) if h):
            sub, subown = merge_extra([v if h else None for v, h in zip(values, have)], sizes, (*path, key))
            merged[key] = sub
            for o, s in zip(own, subown):
                if s:
                    o[key] = s
        elif kind == ("batch",) and all(v == values[have.index(True)] for v, h in zip(values, have) if h):
            merged[key] = values[have.index(True)]  # the same in every chunk that has it
        else:  # unknown, or batch-wide facts the chunks differ in: each chunk's own
            for o, v, h in zip(own, values, have):
                if h:
                    o[key] = v
    return merged, own


def merge(parts: list) -> Stats:
    """The stats of a batch prefilled in row chunks, from ``parts`` [(rows, the chunk's Stats)] in batch
    order, as the whole batch prefilled at once would describe each sample: the per-sample lists
    (``kept_tokens``, ``kept_indices`` per layer, ``visual_tokens``, per-sample ``extra`` entries such as
    ``sample_prefill_flops``) concatenated; ``prefill_flops`` and ``baseline_prefill_flops`` summed (what
    the chunks executed together: each chunk pads to its own widths, so the executed total can differ
    from the whole batch's; the baseline, every row at the prompt's width, does not);
    ``tokens_per_layer``: per layer the most slots a chunk ran on (what the decoder's buffers hold);
    ``extra["chunks"]``: per chunk its rows [start, stop), its ``tokens_per_layer`` and FLOPs, and, under
    ``"extra"``, its entries that are not per sample and not the same in every chunk (a batch-wide fact
    the chunks differ in, as PDrop's schedule when their largest images differ, or one unknown here). A
    chunk run untouched (text-only, its batch pruned) made no pruner entries: its rows get the value a
    prompt without images gets in a whole batch where known (``PER_SAMPLE``), else None."""
    stats = [s for _, s in parts]
    first = stats[0]
    layers = len(first.kept_tokens)
    if any(len(s.kept_tokens) != layers for s in stats):
        raise ValueError("mmsink: the chunks' stats cover different numbers of layers")
    kept = [[x for s in stats for x in s.kept_tokens[i]] for i in range(layers)]
    idx = [[x for s in stats for x in s.kept_indices[i]] for i in range(layers)]
    visual = [x for s in stats for x in s.visual_tokens]
    widths = [s.tokens_per_layer for s in stats if s.tokens_per_layer]
    slots = [max(w) for w in zip(*widths)] if widths else []
    extra, own = merge_extra([s.extra for s in stats], [len(s.visual_tokens) for s in stats])
    extra["chunks"] = []
    for (rows, s), o in zip(parts, own):
        record = {
            "rows": [rows.start, rows.stop],
            "tokens_per_layer": list(s.tokens_per_layer),
            "prefill_flops": s.prefill_flops,
            "baseline_prefill_flops": s.baseline_prefill_flops,
        }
        extra["chunks"].append(record | ({"extra": o} if o else {}))
    flops = sum(s.prefill_flops for s in stats)
    base = sum(s.baseline_prefill_flops for s in stats)
    return Stats(first.method, first.budget, kept, idx, visual, flops, base, slots, extra)


class Chunked:
    """Stats deferred for a batch prefilled in row chunks: ``add`` each chunk's (deferred) stats as its
    prefill ends; calling it builds each and merges them (``merge``). A chunk whose prefill made no stats
    of its own (``part`` is this object still, or None) leaves none for the batch: None."""

    def __init__(self):
        self.parts: list = []

    def add(self, rows: slice, part) -> Chunked:
        self.parts.append((rows, None if part is self else part))
        return self

    def __call__(self) -> Stats | None:
        if any(part is None for _, part in self.parts):
            return None
        return merge([(rows, part() if callable(part) else part) for rows, part in self.parts])
