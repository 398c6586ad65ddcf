"""VAR — Visual Attention Redistribution (Kang et al., ICLR 2025), on the grouped log-sum-exp primitive.

Per layer (default 2..L-2), keys fall in four groups: text sinks, visual sinks, visual non-sinks, other.
A token is a sink when phi(x) = max_{d in sink dims} |x_d / RMS(x)| > tau on the hidden state entering
the layer (prompt tokens only; generated tokens never are). For each (sample, head, query row) after the
image, in prefill and in every decode step, the head is image-centric when its image mass >= 0.2 and its
visual non-sink share >= rho (the paper's test; the official code inverts it) and the sample has a visual
sink in this layer. Then sinks keep (1 - p) of their weight and the freed mass goes to the visual
non-sink tokens in proportion to their weight (the paper's p; the official code keeps p instead).
Only group masses change, so the result comes from per-group partial outputs: no attention matrix.

On CUDA (with Triton) a layer's VAR work after the plain attention (and its key codes) runs through
``torch.compile``: a few fused kernels instead of ~50 small launches a layer, which bound a batch-1
prefill by the host. ``VARConfig(compile=False)`` keeps it eager; ``compile=True`` compiles on any device.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.attention import (
    attention_lse,
    attention_lse_math,
    group_indices,
    mask_to_bool,
    plain_attention,
    repeat_kv,
)
from ..core.compiling import can_compile, or_eager

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
    compile: bool | None = None  # torch.compile VAR's per-layer work; None: on CUDA when Triton is there

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"mmsink: VAR tau must be > 0, got {self.tau}")
        for name in ("rho", "p", "image_mass"):
            x = getattr(self, name)
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"mmsink: VAR {name} must lie in [0, 1], got {x}")
        if self.compile not in (None, True, False):
            raise ValueError(f"mmsink: VAR compile must be None, True or False, got {self.compile!r}")
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
    # the channels as views stacked (indexing with a list would copy it to the device first)
    return (torch.stack([x[..., d] for d in dims], -1).abs() / rms).amax(-1)


def key_codes(hidden, visual, prompt, cfg: VARConfig, fns: CompiledVAR | None = None) -> torch.Tensor:
    """[B, n] group code of each slot of the layer's input. ``fns``: the wrap's compiled functions."""
    if compiling(cfg, hidden.device):
        return compiled(fns, "key_codes")(hidden, visual, prompt, cfg)
    return key_codes_eager(hidden, visual, prompt, cfg)


def key_codes_eager(hidden, visual, prompt, cfg: VARConfig) -> torch.Tensor:
    sink = (sink_scores(hidden, cfg.sink_dims) > cfg.tau) & prompt
    # TEXT_SINK == 1 and OTHER == 0: outside the image a slot's code is its sink flag
    return torch.where(visual, torch.where(sink, VISUAL_SINK, VISUAL), sink.long())


def code_vector(device) -> torch.Tensor:
    """``CODES`` (1, 2, 3, 0) as a tensor on ``device``, built on the device (a tensor from host data would
    be a blocking copy; a compiled caller folds it into its kernels)."""
    return torch.arange(1, len(CODES) + 1, device=device).remainder_(len(CODES))


def groups_of(codes, valid, vec=None):
    """[B, G, kv] membership of each key group (``CODES`` order) and [B, 1, 1] whether a sample has a
    visual sink among its valid keys. ``vec``: ``code_vector(codes.device)`` when the caller has it."""
    vec = code_vector(codes.device) if vec is None else vec
    groups = (codes[:, None] == vec[None, :, None]) & valid[:, None]
    return groups, groups[:, CODES.index(VISUAL_SINK)].any(1)[:, None, None]


def group_parts(qg, k, v, allowed, groups, scale, fn):
    """Every group's partial output and mass in one attention call: ``qg`` [B, H, G*R, d] holds the R
    query rows once per group (group-major), each copy allowed only its group's keys (``allowed``
    [B, 1, R, kv], ``groups`` [B, G, kv]). Returns outputs [B, H, G, R, d] and masses [B, H, G, R] (fp32,
    exp(LSE_g - LSE_all))."""
    b, h, _, d = qg.shape
    g_n, r = groups.shape[1], allowed.shape[2]
    ag = (allowed[:, :, None] & groups[:, None, :, None, :]).flatten(2, 3)  # [B, 1, G*R, kv], a view
    o, lse = fn(qg, k, v, ag, scale)
    lse = lse.view(b, h, g_n, r)
    masses = torch.exp(lse - torch.logsumexp(lse, 2, keepdim=True)).nan_to_num(0.0)
    return o.view(b, h, g_n, r, d), masses


def var_mix(cfg: VARConfig, outs, masses, has_visual_sink):
    """New outputs [B, H, R, d] (fp32) of the edited rows from the groups' partial outputs [B, H, G, R, d]
    and masses [B, H, G, R] (``CODES`` order): in image-centric heads the sinks keep (1 - p) of their
    mass, the visual non-sinks get the rest."""
    m_ts, m_vs, m_v, m_o = masses.unbind(2)
    img = m_vs + m_v
    chosen = (img >= cfg.image_mass) & (m_v >= cfg.rho * img)
    if not cfg.rho * cfg.image_mass > 1e-30:  # else m_v >= rho * img >= rho * image_mass > 0 already
        chosen = chosen & (m_v > 0)
    p = torch.where(chosen & has_visual_sink, cfg.p, 0.0)
    freed = p * (m_ts + m_vs)
    # each group's weighted output in one product; summed in the order of the per-group formula
    # (1 - p) * (m_ts O_ts + m_vs O_vs) + (m_v + freed) O_v + m_o O_o
    t = torch.stack([m_ts, m_vs, m_v + freed, m_o], 2)[..., None] * outs.float()
    return (1 - p)[..., None] * (t[:, :, 0] + t[:, :, 1]) + t[:, :, 2] + t[:, :, 3]


def decode_attention(q, k, v, valid, codes, scale, cfg: VARConfig, fns: CompiledVAR | None = None):
    """VAR for a decode step whose every query row is edited (``generate_fast``): q [B, H, n, d] (n new
    tokens, already in the buffer), k / v [B, kv_heads, slots, d], ``valid`` [B, slots] the filled slots,
    ``codes`` [B, slots]; ``fns``: the wrap's compiled functions. Returns [B, H, n, d] in q's dtype."""
    if compiling(cfg, q.device):  # inside the decode step's CUDA graph: fewer kernels a replay
        return compiled(fns, "decode_attention")(q, k, v, valid, codes, None, scale, cfg)
    return decode_attention_eager(q, k, v, valid, codes, None, scale, cfg)


def decode_attention_eager(q, k, v, valid, codes, vec, scale, cfg: VARConfig, lse=attention_lse):
    h = q.shape[1]
    groups, has_vs = groups_of(codes, valid, vec)
    kk, vv = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // v.shape[1])
    qg = q.repeat(1, 1, groups.shape[1], 1)
    allowed = valid[:, None, None, :].expand(-1, 1, q.shape[2], -1)
    outs, masses = group_parts(qg, kk, vv, allowed, groups, scale, lse)
    return var_mix(cfg, outs, masses, has_vs).to(q.dtype)


def decode_attention_fused(q, k, v, valid, codes, vec, scale, cfg: VARConfig):
    """What the compiler gets for a decode step (the bias laid out by the compiler)."""
    return decode_attention_eager(q, k, v, valid, codes, vec, scale, cfg, attention_lse_unpadded)


def attention_lse_unpadded(q, k, v, allowed, scale):
    """``attention_lse`` for compiled code: the bias as one ``where`` whose layout the compiler aligns for
    the kernel itself (``lse_masks``' buffer padded to a multiple of 8 keys would make a graph's shape
    guards depend on the key count modulo 8: a recompile)."""
    bias = torch.where(allowed, 0.0, float("-inf")).to(q.dtype)
    return attention_lse(q, k, v, allowed, scale, (allowed.any(-1), bias))


def edited_output(q, kk, vv, out, codes, valid, allowed, ri, inv, scale, cfg, math):
    """``edit_rows`` as the compiler gets it (one region for everything after the plain attention; the
    log-sum-exp's math form for eager attention, else the unpadded one): the rows' masks and indices are
    made in the region from ``allowed``, ``ri`` and ``inv`` (``edit_index``), fewer inputs (each costs the
    call a guard and a check)."""
    lse = attention_lse_math if math else attention_lse_unpadded
    return edit_rows(q, kk, vv, out, codes, valid, edit_index(allowed, ri, inv), scale, cfg, lse)


def edit_index(allowed, ri, inv) -> tuple:
    """What ``edit_rows`` needs of the edited rows, from ``allowed`` [B, 1, n, kv], ``ri`` [B, R] (the
    edited rows, -1 padding) and ``inv`` [B, n] (each row's place in ``ri``, -1 if not edited): their key
    masks [B, 1, R, kv], the rows once per group (group-major) [B, G*R], and each query row's place and
    whether it is edited [B, 1, n, 1]. Made in the compiled region, or once per segment when eager."""
    safe = ri.clamp(min=0)  # padding rows compute row 0's edit, which no row reads
    allowed_r = allowed.gather(2, safe[:, None, :, None].expand(-1, allowed.shape[1], -1, allowed.shape[3]))
    at = inv.clamp(min=0)[:, None, :, None]
    return allowed_r, safe.repeat(1, len(CODES)), at, (inv >= 0)[:, None, :, None]


def edit_rows(q, kk, vv, out, codes, valid, index, scale, cfg, lse, vec=None):
    """``out`` (the plain attention [B, H, n, d]) with the edited rows replaced, as [B, n, H, d], compiled
    (``edited_output``) or eager (``var_attention``): written in one pass, no copy of ``out`` then a
    scatter. ``index``: ``edit_index``'s; ``lse``: the grouped attention (``attention_lse`` or its math or
    unpadded form); ``vec``: ``code_vector``'s, when the caller has it."""
    allowed_r, rows_g, at, edited = index
    h, d = q.shape[1], q.shape[3]
    groups, has_vs = groups_of(codes, valid, vec)
    qg = q.gather(2, rows_g[:, None, :, None].expand(-1, h, -1, d))
    outs, masses = group_parts(qg, kk, vv, allowed_r, groups, scale, lse)
    new = var_mix(cfg, outs, masses, has_vs).to(out.dtype)
    return torch.where(edited, new.gather(2, at.expand(-1, h, -1, d)), out).transpose(1, 2).contiguous()


def prefill_edit(q, kk, vv, out, hidden, visual, prompt, valid, allowed, ri, inv, scale, cfg, math):
    """A prefill layer's key codes (from ``hidden``, the state entering the layer) and ``edited_output``
    with them: what the compiler gets for a prefill layer, one call (each call costs the host a guard
    check and wrappers, the larger part of a compiled VAR layer at batch 1). Returns (output, codes)."""
    codes = key_codes_eager(hidden, visual, prompt, cfg)
    return edited_output(q, kk, vv, out, codes, valid, allowed, ri, inv, scale, cfg, math), codes


def layer_attention(q, k, v, mask, valid, scale, ri, cfg: VARConfig, source):
    """``var_attention``'s compiled form as plain code, for a caller that compiles the whole layer
    (``generate_fast``'s fused prefill tail; SDPA base): every row's plain attention, then
    ``prefill_edit``. q [B, H, n, d], k / v [B, kv_heads, n, d], ``mask`` as the layer received it,
    ``valid`` [B, n], ``ri`` [B, R] edited rows, ``source`` (hidden, visual, prompt). Returns (output
    [B, n, H, d], codes [B, n])."""
    b, h, n, _ = q.shape
    kk, vv = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // v.shape[1])
    allowed = mask_to_bool("sdpa", mask, valid, n, k.shape[2], b, q.device)
    if mask is None:  # ``plain_attention``'s call, causal also for one row (the same: one key), so that
        # a compiler tracing n symbolically need not test n > 1
        out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale)
    else:
        out = plain_attention(q, kk, vv, allowed, scale, "sdpa", masked=True)
    inv = row_places(ri, n)
    return prefill_edit(q, kk, vv, out, *source, valid, allowed, ri, inv, scale, cfg, False)


def row_places(ri, n: int) -> torch.Tensor:
    """[B, n]: each query row's place in ``ri`` ([B, R] rows, -1 padding); -1 for a row not in it."""
    b, r = ri.shape
    at = torch.where(ri >= 0, ri, n)  # padding: an extra column, cut off
    places = torch.arange(r, device=ri.device).expand(b, -1)
    return torch.full((b, n + 1), -1, dtype=torch.long, device=ri.device).scatter_(1, at, places)[:, :n]


def var_attention(
    q, k, v, mask, key_valid, scale, base, codes, rows, cfg: VARConfig, memo=None, fns=None, source=None
):
    """Attention with VAR applied to ``rows`` ([B, n] bool, or [B, R] row indices with -1 padding);
    ``codes`` [B, kv] group of each key, or None: made from ``source`` (hidden [B, kv, D] entering the
    layer, visual and prompt slots [B, kv]; compiled, in the same call as the edit). Every row gets plain
    attention (the backend's kernel; ``mask`` as the layer received it); the edited rows are then
    recomputed from per-group partial outputs and masses. ``memo``: a dict the caller keeps for layers
    with the same ``key_valid`` and ``rows`` (a segment): the masks and indices made from them are made
    once per ``mask`` object. ``fns``: the wrap's ``CompiledVAR``. Returns (output [B, n, H, d], codes,
    FLOPs executed)."""
    b, h, n, d = q.shape
    kv = k.shape[2]
    if key_valid is not None:
        valid = key_valid
    else:
        valid = torch.ones(b, kv, dtype=torch.bool, device=q.device if codes is None else codes.device)
    memo = {} if memo is None else memo
    fused = compiling(cfg, q.device)
    if "mask" not in memo or memo["mask"] is not mask or memo["dtype"] != q.dtype:
        # membership, not index lists: the sink groups change every layer and indexing them costs a
        # device read each; with VAR's few edited rows, attending every key under a group mask is cheap
        allowed = mask_to_bool(base, mask, key_valid, n, kv, b, q.device)
        ri = rows if rows.dtype == torch.long else group_indices(rows)  # [B, R] edited rows, -1 padding
        memo.clear()
        memo.update(mask=mask, dtype=q.dtype, allowed=allowed, ri=ri)
        if fused:  # the rest is made in the compiled region
            memo["inv"] = row_places(ri, n)
        else:
            memo.update(index=edit_index(allowed, ri, row_places(ri, n)), vec=code_vector(q.device))
    allowed = memo["allowed"]
    kk, vv = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // v.shape[1])
    out = plain_attention(q, kk, vv, allowed, scale, base, masked=mask is not None)
    flops = edit_flops(b, h, n, kv, d, memo["ri"].shape[1])
    if fused:
        rest = (valid, allowed, memo["ri"], memo["inv"], scale, cfg, base == "eager")
        if codes is None:
            out, codes = compiled(fns, "prefill_edit")(q, kk, vv, out, *source, *rest)
        else:
            out = compiled(fns, "edited_output")(q, kk, vv, out, codes, *rest)
        return out, codes, flops
    if codes is None:
        codes = key_codes_eager(*source, cfg)
    # the compiled region's function; the bias padded for the fused kernel here (no compiler lays it out)
    lse = attention_lse_math if base == "eager" else attention_lse
    return edit_rows(q, kk, vv, out, codes, valid, memo["index"], scale, cfg, lse, memo["vec"]), codes, flops


def edit_flops(b: int, h: int, n: int, kv: int, d: int, r: int) -> int:
    """FLOPs ``var_attention`` executes: every row's plain attention, then ``r`` rows once per group."""
    return 4 * b * h * n * kv * d + 4 * b * h * r * kv * d * len(CODES)


# ---- torch.compile of the per-layer work


def compiling(cfg: VARConfig, device) -> bool:
    """Whether VAR's per-layer work runs compiled: ``cfg.compile``, or when None on CUDA with Triton."""
    return can_compile(device) if cfg.compile is None else cfg.compile


class Compiled:
    """``fn`` through ``torch.compile`` (no graph breaks), made at first use. Shapes are static until a
    second shape comes, then dynamic (torch's automatic dynamic shapes): every layer of a prompt shares
    one graph, a new prompt length costs at most one recompile, and a static graph costs the host less
    per call than a dynamic one. Eager after a warning if the compiler fails, and eager for a call under
    a torch function or dispatch mode (the compiler refuses or traces those). Inside a caller's compiled
    region (e.g. a compiled decode layer step) ``fn`` is traced into the caller's graph."""

    def __init__(self, fn):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, *args):
        if torch.compiler.is_compiling():  # traced into a caller's compiled region: part of its graph
            return self.fn(*args)
        if self.failed or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, fullgraph=True)
        return or_eager(
            self, self.compiled, self.fn, args, {}, f"VAR's {self.fn.__name__}", "VARConfig(compile=False)"
        )


class CompiledVAR:
    """VAR's compiled functions for one wrapped model: the handle keeps them and ``unwrap`` drops them, so a
    compiler failure turns only this wrap's calls eager. Two wraps' ``torch.compile`` of one function
    share dynamo's graphs (its cache is on the function's code): a new wrap does not recompile."""

    def __init__(self):
        self.key_codes = Compiled(key_codes_eager)
        self.prefill_edit = Compiled(prefill_edit)  # a prefill layer's codes and edit: one call
        self.edited_output = Compiled(edited_output)  # a cached step's (``generate``) edit
        self.decode_attention = Compiled(decode_attention_fused)

    def items(self):
        return vars(self).items()


def compiled(fns: CompiledVAR | None, name: str) -> Compiled:
    """``fns``' function ``name``; a fresh one for a call outside a wrap (``fns`` None: nothing kept, a
    compiler failure warns again the next call)."""
    return getattr(CompiledVAR() if fns is None else fns, name)


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


def prefill_reweight(ctx, layer: int, hidden, cfg: VARConfig, fns: CompiledVAR | None = None):
    """The attention edit of a prefill layer: key codes from the hidden state entering it (made in the
    attention call, with the edit: compiled, one call a layer), rows after the image (instruction, answer
    and later tokens; indexed once per segment). ``fns``: the wrap's."""
    seg = ctx.seg
    source = (hidden, ctx.visual(), ctx.in_prompt())
    rows = edited_rows_of(ctx)

    def reweight(q, k, v, mask, scale, base):
        memo = seg.cache.setdefault("var_memo", {})  # masks and row indices: once per segment
        out, codes, flops = var_attention(
            q, k, v, mask, seg.valid, scale, base, None, rows, cfg, memo, fns, source
        )
        ctx.var_codes[layer] = codes
        ctx.attn_flops[layer] = flops
        return out

    return reweight


def edited_rows_of(ctx) -> torch.Tensor:
    """[B, R] the current segment's slots VAR edits (real text after a sample's first visual slot; -1
    padding), indexed once per segment."""
    seg = ctx.seg
    if "var_rows" not in seg.cache:
        vis = ctx.visual()
        rows = seg.valid & ~vis & (vis.cumsum(1) > 0)
        seg.cache["var_rows"] = group_indices(rows, ctx.text_after_image_width())
    return seg.cache["var_rows"]


def tail_inputs(ctx) -> tuple:
    """What a VAR layer after a prefill's hand-off needs of the plan (``generate_fast`` runs those layers
    outside the model, on the final segment): (visual slots, prompt slots, valid slots [B, n], edited rows
    [B, R]), the tensors ``prefill_reweight`` reads."""
    return ctx.visual(), ctx.in_prompt(), ctx.seg.valid, edited_rows_of(ctx)


def anchor_edit(ctx, layer: int, anchor, cfg: VARConfig):
    """The anchor row's probabilities as VAR redistributes them (a pruner ranking at a VAR layer); the
    layer's codes are read when called (after its attention, which makes them)."""
    vis = ctx.visual()
    after_image = vis.cumsum(1).gather(1, anchor[:, None])[:, 0] > 0
    rows = after_image & ~vis.gather(1, anchor[:, None])[:, 0]
    return lambda probs: redistribute_rows(probs, ctx.var_codes[layer], rows, cfg)


def decode_reweight(cache, layer: int, cfg: VARConfig, fns: CompiledVAR | None = None):
    """The attention edit of a cached decode step: every new row, keys grouped by the prefill's codes.
    ``fns``: the wrap's compiled functions."""
    codes = cache.layer_codes[layer]
    valid = cache.segment_valid[cache.layer_segment[layer]]

    def reweight(q, k, v, mask, scale, base):
        rows = torch.arange(q.shape[2], device=q.device).expand(q.shape[0], -1)
        c, ok = codes.to(q.device), valid.to(q.device)
        return var_attention(q, k, v, mask, ok, scale, base, c, rows, cfg, None, fns)[0]

    return reweight
