"""RegCache (Kim et al., "Activation Quantization of Vision Encoders Needs Prefixing Registers").

Vision towers grow a few high-norm tokens in their middle blocks; under activation quantization they set
the scale of everything else. RegCache gives the tower registers instead: the highest-norm tokens of a
calibration set, taken at the quantization-sensitive block, are run once through the unquantized tower and
their keys and values averaged per block; at inference that cache, replicated ``tau`` times, is prefixed
to the keys and values of every block from ``start`` on (middle-layer prefixing). The registers are keys
and values only: they are never queries, never pass a linear layer and never reach the projector, so a
vision-stage pruner (VisionZip) scores the image's own tokens exactly as before.
Token deletion (``delete=k``, CLIP towers): at the sensitive block each image's (tile's) ``k`` patch tokens
of largest L2 norm leave the sequence; the blocks from there on run without them (not as queries, keys or
in the quantizer's scales), and each block's output at a deleted patch is the mean of the kept patches in
its 3x3 neighbourhood (all kept patches if none), so the projector still gets the full grid. The fill rule
is our reading of the paper's neighbour-mean fill for LLaVA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from mmsink.core.attention import base_function
from mmsink.core.bind import Bound
from mmsink.quant import fake

PREFIX = "mmsink_regcache_"
BASES = ("sdpa", "eager")
TAUS = (1, 2, 4, 8, 15)  # the paper searches tau in 1..15


@dataclasses.dataclass
class TowerParts:
    """What a family tells RegCache about its vision tower (``family.regcache_tower()``: these fields)."""

    tower: torch.nn.Module
    blocks: list  # the tower's blocks, in order
    attns: list  # each block's attention module
    kv: Callable  # (block, block-input rows [n, D]) -> (keys, values) [n, H, hd], no rotary
    linears: Callable  # block -> the block's linear layers (the quantized ones)
    run: Callable  # model inputs (dict) -> the tower output the model reads (features)
    images: Callable | None = (
        None  # tower (args, kwargs) -> [T] image of each packed row; None: rows are images
    )
    lead: int | None = None  # tokens before the square patch grid (CLIP: [CLS], 1); None: no deletion


@dataclasses.dataclass
class RegCache:
    keys: dict  # block -> [H, hd], mean over the register candidates
    values: dict
    tau: int
    sensitive: int  # the quantization-sensitive block the candidates come from
    start: int  # first block with the prefix
    report: dict = dataclasses.field(default_factory=dict)
    delete: int = 0  # patch tokens per image deleted at ``sensitive`` (0: none)

    def __post_init__(self):
        if not isinstance(self.tau, int) or self.tau < 1:
            raise ValueError(f"mmsink: regcache tau must be an integer >= 1, got {self.tau!r}")
        if not isinstance(self.delete, int) or self.delete < 0:
            raise ValueError(f"mmsink: regcache delete must be an integer >= 0, got {self.delete!r}")

    def prefix(self, block: int):
        k, v = self.keys[block], self.values[block]
        return k[:, None].expand(-1, self.tau, -1), v[:, None].expand(-1, self.tau, -1)


def prefixed(base: str):
    fn = base_function(base)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        kv = kwargs.pop("regcache", None)
        if kv is not None:
            b, tau = key.shape[0], kv[0].shape[1]
            key = torch.cat([kv[0].to(key)[None].expand(b, -1, -1, -1), key], 2)
            value = torch.cat([kv[1].to(value)[None].expand(b, -1, -1, -1), value], 2)
            if attention_mask is not None:  # registers are visible to every query
                pad = True if attention_mask.dtype == torch.bool else 0.0
                attention_mask = F.pad(attention_mask, (tau, 0), value=pad)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    return attention


def register() -> None:
    """``mmsink_regcache_<base>``: pure functions; per call the prefix arrives as the ``regcache`` keyword."""
    for base in BASES:
        if PREFIX + base not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(PREFIX + base, prefixed(base))


class Undo:
    def __init__(self, fn):
        self.fn = fn

    def remove(self) -> None:
        self.fn()


def parts_of(family) -> TowerParts:
    get = getattr(family, "regcache_tower", None)
    if get is None:
        raise ValueError(f"mmsink: regcache / quant_vision is not available for {family.class_name}")
    return TowerParts(**get())


def install(model, parts: TowerParts, rc: RegCache | None, quant, enabled=lambda: True) -> list:
    """Hooks putting the prefix and the fake quantizer on the tower; returns removables."""
    out = []
    if rc is not None:
        out += install_prefix(model, parts, rc, enabled)
        if rc.delete:
            out += install_delete(parts, rc, enabled)
    if quant is not None:
        state: dict = {}
        if parts.images is not None:

            def images(module, args, kwargs):
                state["images"] = parts.images(args, kwargs)

            out.append(parts.tower.register_forward_pre_hook(images, with_kwargs=True))
        for i in range(len(parts.blocks)):
            out += [fake.bind_linear(lin, quant, state, enabled) for lin in parts.linears(i)]
    return out


def install_prefix(model, parts: TowerParts, rc: RegCache, enabled) -> list:
    if max(rc.keys) >= len(parts.blocks):
        raise ValueError("mmsink: this RegCache was curated on a deeper tower than this model's")
    cfg = parts.attns[0].config
    base = cfg._attn_implementation or "eager"
    if base not in BASES:
        raise ValueError(f"mmsink: regcache needs the vision tower on sdpa or eager attention, not {base!r}")
    register()
    model.set_attn_implementation({"vision_config": PREFIX + base})
    out = [Undo(lambda: model.set_attn_implementation({"vision_config": base}))]
    for i in sorted(rc.keys):
        prefix = rc.prefix(i)

        def hook(module, args, kwargs, prefix=prefix):
            if enabled():
                kwargs["regcache"] = prefix
            return args, kwargs

        out.append(parts.attns[i].register_forward_pre_hook(hook, with_kwargs=True))
    return out


def install_delete(parts: TowerParts, rc: RegCache, enabled) -> list:
    if parts.lead is None:
        raise ValueError("mmsink: regcache delete= needs a CLIP tower (LLaVA-1.5 / NeXT), not this one")
    state: dict = {}
    return [
        deleting(parts.blocks[i], i == rc.sensitive, rc.delete, parts.lead, state, enabled)
        for i in range(rc.sensitive, len(parts.blocks))
    ]


def deleting(block, first: bool, k: int, lead: int, state: dict, enabled) -> Bound:
    """``block.forward`` on the kept rows only; the first deleting block picks them (per image, the ``k``
    patches of largest norm of its input) for the blocks after it, which each run in the same forward."""

    def make(previous):
        def forward(self, hidden_states, *args, **kwargs):
            if not enabled():
                return previous(hidden_states, *args, **kwargs)
            if (args[0] if args else kwargs.get("attention_mask")) is not None:
                raise ValueError("mmsink: regcache delete= needs a tower run without an attention mask")
            b, n, d = hidden_states.shape
            if first:  # kept rows in order, found by a stable sort (no host sync, unlike nonzero)
                state["deleted"] = deleted_rows(hidden_states, k, lead)
                state["kept"] = state["deleted"].to(torch.int8).argsort(dim=1, stable=True)[:, : n - k, None]
            deleted = state["deleted"]
            idx = state["kept"].expand(-1, -1, d)
            out = previous(hidden_states.gather(1, idx), *args, **kwargs)
            return fill(hidden_states.new_zeros(b, n, d).scatter(1, idx, out), deleted, lead)

        return forward

    return Bound(block, "forward", make)


def deleted_rows(h: torch.Tensor, k: int, lead: int) -> torch.Tensor:
    """[B, N] bool: each image's ``k`` patch rows (after the ``lead`` ones) of largest L2 norm."""
    if not 1 <= k < h.shape[1] - lead:
        raise ValueError(f"mmsink: regcache delete must be in 1..{h.shape[1] - lead - 1}, got {k}")
    top = fake.wide(h[:, lead:]).norm(dim=-1).topk(k, dim=1).indices + lead
    return torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device).scatter(1, top, True)


def fill(h: torch.Tensor, deleted: torch.Tensor, lead: int) -> torch.Tensor:
    """``h`` with each deleted patch set to the mean of the kept patches in its 3x3 window on the grid."""
    b, n, d = h.shape
    g = math.isqrt(n - lead)
    if g * g != n - lead:
        raise ValueError(f"mmsink: regcache delete= needs a square patch grid, got {n - lead} patches")
    x = h[:, lead:].transpose(1, 2).reshape(b, d, g, g)
    kept = (~deleted[:, lead:]).to(h.dtype).view(b, 1, g, g)
    total = F.avg_pool2d(x * kept, 3, 1, 1, divisor_override=1)
    count = F.avg_pool2d(kept, 3, 1, 1, divisor_override=1)
    every = (x * kept).sum((2, 3), keepdim=True) / kept.sum((2, 3), keepdim=True)
    mean = torch.where(count > 0, total / count.clamp_min(1), every)
    grid = torch.where(kept.bool(), x, mean).reshape(b, d, g * g).transpose(1, 2)
    return torch.cat([h[:, :lead], grid], 1)


# ---------------------------------------------------------------------------------------------- curation


def curate(
    model, batches, quant="w8a8", tau=None, start=None, sensitive=None, candidates: int = 32, delete: int = 0
):
    """A RegCache for ``model`` from calibration ``batches`` (model inputs: dicts with ``pixel_values``
    and the family's image keys). ``sensitive``: the block the candidates come from (default: the block
    whose quantization alone, at ``quant``, moves the tower output most - the paper's label-free
    criterion); ``start``: first prefixed block (default: ``sensitive``); ``tau``: replicas of the cache
    (default: the one of 1, 2, 4, 8, 15 with the smallest quantized output error, with ``delete``);
    ``delete``: patch tokens per image deleted at the sensitive block (see the module docstring)."""
    from mmsink.core.hooks import ATTR
    from mmsink.patches import family_for

    if ATTR in getattr(model, "__dict__", {}):
        raise ValueError("mmsink: curate a RegCache on the unwrapped model (call mmsink.unwrap first)")
    if not batches:
        raise ValueError("mmsink: regcache curation needs at least one calibration batch")
    if not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"mmsink: regcache candidates must be an integer >= 1, got {candidates!r}")
    if not isinstance(delete, int) or delete < 0:
        raise ValueError(f"mmsink: regcache delete must be an integer >= 0, got {delete!r}")
    qcfg = fake.make_config(quant)
    parts = parts_of(family_for(model))
    n = len(parts.blocks)
    inputs, refs = block_inputs(parts, batches)
    report: dict = {}
    if sensitive is None:
        errs = [output_error(model, parts, batches, refs, None, qcfg, only=i) for i in range(n)]
        report["block_error"] = errs
        sensitive = max(range(n), key=errs.__getitem__)
    start = sensitive if start is None else start
    if not 0 <= sensitive < n or not 0 <= start < n:
        raise ValueError(f"mmsink: regcache blocks must be in 0..{n - 1}")
    rows = inputs[sensitive]
    top = rows.float().abs().amax(-1).topk(min(candidates, rows.shape[0])).indices
    report["candidate_linf"] = rows[top].float().abs().amax(-1).mean().item()
    keys, values = {}, {}
    with torch.no_grad():
        for i in range(start, n):
            k, v = parts.kv(i, inputs[i][top])
            keys[i], values[i] = k.float().mean(0), v.float().mean(0)
    rc = RegCache(keys, values, tau or 1, sensitive, start, report, delete)
    if tau is None and qcfg is not None:
        errs = {}
        for t in TAUS:
            rc.tau = t
            errs[t] = output_error(model, parts, batches, refs, rc, qcfg)
        report["tau_error"] = errs
        rc.tau = min(errs, key=errs.get)
    return rc


def block_inputs(parts: TowerParts, batches):
    """(per block, its input rows [rows, D] over all batches; per batch, the plain tower output)."""
    seen: list = [[] for _ in parts.blocks]

    def taker(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen[i].append(x.detach().reshape(-1, x.shape[-1]))

        return hook

    hooks = [b.register_forward_pre_hook(taker(i), with_kwargs=True) for i, b in enumerate(parts.blocks)]
    try:
        with torch.no_grad():
            refs = [parts.run(b) for b in batches]
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen], refs


def output_error(model, parts, batches, refs, rc, qcfg, only=None) -> float:
    """Mean relative squared error of the tower output against ``refs`` with ``rc`` and the quantizer
    installed (``only``: quantize that block alone, no prefix)."""
    if only is not None:
        sub = dataclasses.replace(parts, linears=lambda i: parts.linears(i) if i == only else [])
        hooks = install(model, sub, None, qcfg)
    else:
        hooks = install(model, parts, rc, qcfg)
    try:
        with torch.no_grad():
            errs = [
                ((parts.run(b) - r).float().pow(2).mean() / r.float().pow(2).mean()).item()
                for b, r in zip(batches, refs)
            ]
    finally:
        for h in reversed(hooks):
            h.remove()
    return sum(errs) / len(errs)
