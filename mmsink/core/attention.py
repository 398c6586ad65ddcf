"""Attention seams: one registered attention function per base backend, masks for pruned layers, and
the grouped log-sum-exp primitive that reweights key groups without an attention matrix.

The registered function (``mmsink_sdpa`` etc.) is a pure function: per-call behaviour arrives through
the ``mmsink`` keyword that our decoder-layer hook injects; without it the base backend runs untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from . import varlen

BASES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")
PREFIX = "mmsink_"


def registered_name(base: str) -> str:
    return PREFIX + base


def base_of(name: str | None) -> str | None:
    """The base backend under a registered name (``mmsink_sdpa`` -> ``sdpa``); other names as they are."""
    return name[len(PREFIX) :] if name and name.startswith(PREFIX) else name


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # transformers keeps eager attention inside each modeling file; this is the same arithmetic.
    n = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n), repeat_kv(value, n)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(w, v)
    return out.transpose(1, 2).contiguous(), w


def base_function(base: str) -> Callable:
    if base == "eager":
        return _eager
    return ALL_ATTENTION_FUNCTIONS[base]


@dataclass
class Directive:
    """What one layer's attention call must do beyond plain attention (set per call by the layer hook)."""

    layer: int
    observe: bool = False  # keep references to q (anchor rows), k, v for a pruner
    anchor: torch.Tensor | None = None  # [B] local index of the anchor query row
    reweight: Callable | None = None  # fn(q, k, v, key_valid, scaling, base) -> output [B, n, H, hd]
    varlen: dict | None = None  # packed layout of a padded segment (mmsink.varlen.pack)
    rows: torch.Tensor | None = None  # [B, R] more query rows to observe (slots, -1 padding), as q_rows
    observed: dict = field(default_factory=dict)


def mmsink_attention(base: str):
    fn_base = base_function(base)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        d: Directive | None = kwargs.pop("mmsink", None)
        if d is None:
            return fn_base(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if d.observe:
            at = d.anchor.to(query.device)[:, None, None, None].expand(-1, query.shape[1], 1, query.shape[3])
            d.observed.update(q=query.gather(2, at)[:, :, 0], k=key, v=value, scale=scaling)
            if d.rows is not None:  # [B, H, R, d]; padding rows read slot 0 (the caller masks them)
                at = d.rows.clamp(min=0)[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3])
                d.observed["q_rows"] = query.gather(2, at)
        if d.reweight is not None:
            out = d.reweight(query, key, value, attention_mask, scaling, base)
            return out, None
        if d.varlen is not None and query.shape[2] == key.shape[2] and varlen.usable(query, scaling):
            return varlen.attention(query, key, value, d.varlen, scaling), None
        return fn_base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    return attention


def register() -> None:
    """Register ``mmsink_<base>`` names once. The entries are pure functions: no model sees another's
    state through them."""
    for base in BASES:
        name = registered_name(base)
        if name in ALL_ATTENTION_FUNCTIONS:
            continue
        if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
            continue
        AttentionInterface.register(name, mmsink_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


# ----------------------------------------------------------------------------------------------- masks


def allowed_matrix(key_valid: torch.Tensor, n_q: int) -> torch.Tensor:
    """[B, 1, n_q, kv] bool: causal by slot order (slots are sorted by position, padding on the left),
    padding keys masked; a padding query row may see itself so that no row is empty (no NaNs)."""
    kv = key_valid.shape[1]
    dev = key_valid.device
    qi = torch.arange(kv - n_q, kv, device=dev)[:, None]
    kj = torch.arange(kv, device=dev)[None, :]
    causal = kj <= qi
    allowed = causal[None] & key_valid[:, None, :]
    allowed = allowed | (kj == qi)[None]
    return allowed[:, None]


def build_mask(base: str, key_valid: torch.Tensor, n_q: int, dtype: torch.dtype):
    """The mask a base backend expects for a layer whose keys are ``key_valid`` (left-padded slots)."""
    if base.startswith("flash"):
        return key_valid.to(torch.long)
    allowed = allowed_matrix(key_valid, n_q)
    if base == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


def mask_to_bool(base: str, mask, key_valid: torch.Tensor | None, n_q: int, n_kv: int, batch: int, device):
    """Normalise whatever mask a layer received to [B, 1, n_q, n_kv] bool (None means causal)."""
    if mask is None:
        valid = (
            key_valid if key_valid is not None else torch.ones(batch, n_kv, dtype=torch.bool, device=device)
        )
        return allowed_matrix(valid, n_q)
    if mask.dim() == 2:
        return allowed_matrix(mask.bool(), n_q)
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


# ----------------------------------------------------------------------------- grouped log-sum-exp


def lse_masks(allowed: torch.Tensor, dtype: torch.dtype) -> tuple:
    """(rows with an allowed key [B,1|H,n], additive bias [B,1|H,n,m]) for :func:`attention_lse`."""
    # the fused CUDA kernel wants the bias rows 8-aligned in memory: allocate padded, then slice
    m = allowed.shape[-1]
    storage = torch.full(
        (*allowed.shape[:-1], -(-m // 8) * 8), float("-inf"), dtype=dtype, device=allowed.device
    )
    return allowed.any(-1), storage[..., :m].masked_fill_(allowed, 0.0)


LSE_BACKENDS = ("cudnn", "efficient")
LSE_ENV = "MMSINK_LSE_ATTENTION"


@torch.compiler.assume_constant_result
def _lse_forced() -> str:
    # a constant to the compiler: a compiled region keeps the value it was traced with
    forced = os.environ.get(LSE_ENV, "").strip().lower()
    if forced and forced not in LSE_BACKENDS:
        raise ValueError(f"{LSE_ENV}={forced!r}: expected one of {', '.join(LSE_BACKENDS)}")
    return forced


@torch.compiler.assume_constant_result
def _cudnn_usable(index: int) -> bool:
    # cuDNN's fused attention: sm_80 and newer, cuDNN 9 (earlier versions miss short query lengths)
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return torch.cuda.get_device_capability(index)[0] >= 8 and (version or 0) >= 90000


def _aligned(bias) -> bool:
    """Whether every stride but the last is a multiple of 8 elements (what the fused kernels read the
    bias rows at) and the last is 1; symbolic strides count only when known (no shape guard)."""
    if not statically_known_true(bias.stride(-1) == 1):
        return False
    return all(
        statically_known_true(bias.stride(i) % 8 == 0)
        for i in range(bias.dim() - 1)
        if not statically_known_true(bias.size(i) == 1)
    )


def lse_backend(q, bias) -> str:
    """The CUDA kernel :func:`attention_lse` runs: "efficient" (the memory-efficient kernel), or "cudnn"
    (cuDNN's fused attention) where ``MMSINK_LSE_ATTENTION=cudnn`` asks for it and it runs: sm_80+ with
    cuDNN 9, fp16 / bf16, a head dim that is a multiple of 8 up to 128; compiled, only for a bias whose
    layout is known aligned (the compiler pads an unaligned bias for the efficient kernel, not for cuDNN).
    The variable is read at each call (in a compiled region, when it is traced). Not the default: cuDNN's
    kernel is faster at batch 16 but builds a plan for every new shape, and VisiPruner's batch-16 prefill
    did not move with it (evals/results/lse_attention, evals/results/gpu_next/h200)."""
    if _lse_forced() != "cudnn" or not q.is_cuda:
        return "efficient"
    if q.dtype not in (torch.float16, torch.bfloat16) or bias.dtype != q.dtype:
        return "efficient"
    d = q.shape[-1]
    if d % 8 or d > 128 or not _cudnn_usable(q.device.index):
        return "efficient"
    if torch.compiler.is_compiling() and not _aligned(bias):
        return "efficient"
    return "cudnn"


def _padded(bias):
    """``bias`` in 8-aligned rows, as ``lse_masks`` lays it out (a copy where it is not): both fused kernels
    refuse other rows eagerly (compiled, the compiler pads for the efficient one)."""
    if _aligned(bias):
        return bias
    m = bias.shape[-1]
    padded = bias.new_full((*bias.shape[:-1], -(-m // 8) * 8), float("-inf"))
    return padded[..., :m].copy_(bias)


def _cudnn_lse(q, k, v, bias, scale):
    bias = _padded(bias)  # compiled: only an aligned one comes here (lse_backend)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, bias, True, 0.0, False, False, scale=scale
    )[:2]
    # cuDNN's LSE is [B, H, n, 1] (some versions [B, H, n]); the index keeps whatever strides it has
    return out, (lse[..., 0] if lse.dim() == 4 else lse)[..., : q.shape[2]]


def attention_lse(q, k, v, allowed, scale, masks=None):
    """Attention output and log-sum-exp per row over the allowed keys, through a fused kernel when there
    is one. q [B,H,n,d], k/v [B,H,m,d] (heads already repeated), allowed [B,1|H,n,m] bool.
    Rows with no allowed key give output 0 and LSE -inf. ``masks``: ``lse_masks(allowed, q.dtype)`` when
    the caller has them. On CUDA the kernel is :func:`lse_backend`'s."""
    some, bias = masks if masks is not None else lse_masks(allowed, q.dtype)
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias.expand(q.shape[0], q.shape[1], -1, -1), scale=scale
        )[:2]
    elif q.device.type == "cuda" and lse_backend(q, bias) == "cudnn":
        # the bias keeps its size-1 head (batch) dim: cuDNN broadcasts it
        out, lse = _cudnn_lse(q, k, v, bias, scale)
    elif q.device.type == "cuda":
        bias = bias if torch.compiler.is_compiling() else _padded(bias)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias.expand(q.shape[0], q.shape[1], -1, -1), True, 0.0, False, scale=scale
        )[:2]
        lse = lse[..., : q.shape[2]]
    else:
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + bias.float()
        lse = torch.logsumexp(s, -1)
        out = torch.matmul(torch.softmax(s, -1).nan_to_num(0.0), v.float()).to(q.dtype)
    lse = torch.where(some, lse.float(), float("-inf"))
    out = torch.where(some[..., None], out, 0.0)
    return out, lse


def attention_lse_math(q, k, v, allowed, scale):
    """The same as :func:`attention_lse` with plain matmuls (what eager mode runs; FLOPs are visible)."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.matmul(p.to(v.dtype), v)
    return out, lse


def plain_attention(q, k, v, allowed, scale, base: str, masked: bool) -> torch.Tensor:
    """Every query's full attention, as the model's own kernel would give it: the math path for ``eager``,
    else SDPA with ``allowed`` when the model passed a mask, causal (several queries) or bare without one."""
    if base == "eager":
        return attention_lse_math(q, k, v, allowed, scale)[0]
    if not masked:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def grouped_attention(
    q, k, v, allowed, groups, scale, math_only=False, total=None, skip=None, memo=None, skip_mass=True
):
    """Per key group g: the partial output O_g (normalised inside the group) and its mass
    m_g = exp(LSE_g - LSE_all). The full attention output is sum_g m_g O_g; a method that rescales group
    masses only changes the m_g. ``groups``: list of [B, m_g] index tensors into the key axis, with -1
    padding. ``total`` [B,H,n]: LSE over all allowed keys when the caller has it (the plain attention's
    kernel returns it); then group ``skip`` is not attended at all: its output is None and its mass
    1 - sum of the others (the groups cover every allowed key). Returns (outs [G][B,H,n,d] or None,
    masses [G][B,H,n] float32). ``memo``: a dict that keeps each group's key indices and masks for later
    calls with the same ``allowed`` and ``groups`` (index groups only). ``skip_mass`` False: the caller
    does not read group ``skip``'s mass either (left None)."""
    h = q.shape[1]
    fn = attention_lse_math if math_only else attention_lse
    if isinstance(groups, torch.Tensor):  # membership [G, B, kv]: every group in one kernel call
        return grouped_by_membership(q, k, v, allowed, groups, scale, fn)
    outs, lses = [], []
    for g, idx in enumerate(groups):
        if total is not None and g == skip:
            outs.append(None)
            lses.append(None)
            continue
        kept = memo.get(g) if memo is not None else None
        if kept is None:
            safe = idx.clamp(min=0)
            ag = allowed.gather(3, safe[:, None, None, :].expand(-1, allowed.shape[1], allowed.shape[2], -1))
            ag = ag & (idx >= 0)[:, None, None, :]
            kept = (safe[:, None, :, None], ag, None if math_only else lse_masks(ag, q.dtype))
            if memo is not None:
                memo[g] = kept
        gi, ag, masks = kept
        kg = k.gather(2, gi.expand(-1, k.shape[1], -1, k.shape[3]))
        vg = v.gather(2, gi.expand(-1, v.shape[1], -1, v.shape[3]))
        kg, vg = repeat_kv(kg, h // k.shape[1]), repeat_kv(vg, h // v.shape[1])
        o, lse = fn(q, kg, vg, ag, scale) if math_only else fn(q, kg, vg, ag, scale, masks)
        outs.append(o)
        lses.append(lse)
    if total is None:
        total = torch.logsumexp(torch.stack(lses), 0)
    masses = [None if lse is None else torch.exp(lse - total).nan_to_num(0.0) for lse in lses]
    if None in masses and skip_mass:
        rest = [m for m in masses if m is not None]
        rest = rest[0] if len(rest) == 1 else torch.stack(rest).sum(0)  # one other group: no stack, sum
        masses[masses.index(None)] = (1.0 - rest).clamp(min=0.0)
    return outs, masses


def grouped_by_membership(q, k, v, allowed, members, scale, fn):
    """``grouped_attention`` for groups given as membership [G, B, kv]: the query rows are repeated once
    per group along the query axis, each copy allowed only its group's keys, and one attention call
    gives every partial output and LSE (no key / value copies, no per-group launches; the rows are few
    where this is used)."""
    g_n, n = members.shape[0], q.shape[2]
    h = q.shape[1]
    kk, vv = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // v.shape[1])
    qg = q.repeat(1, 1, g_n, 1)  # [B, H, G*n, d], group-major
    ag = torch.cat([allowed & m[:, None, None, :] for m in members], dim=2)  # [B, 1|H, G*n, kv]
    o, lse = fn(qg, kk, vv, ag, scale)
    outs = list(o.split(n, dim=2))
    lses = torch.stack(lse.split(n, dim=2))  # [G, B, H, n]
    total = torch.logsumexp(lses, 0)
    masses = list(torch.exp(lses - total).nan_to_num(0.0))
    return outs, masses


def attention_with_lse(q, k, v, scale):
    """Causal attention over all keys (no padding) and its LSE per row, from one fused kernel where torch
    has one that returns it; None otherwise. q/k/v [B,H,n,d] (heads repeated), n_q == n_kv."""
    if q.shape[2] != k.shape[2]:
        return None
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True, scale=scale
        )[:2]
        return out, lse.float()
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, True, False, scale=scale
            )[:2]
        except RuntimeError:  # no flash kernel for this GPU / head size
            return None
        return out, lse[..., : q.shape[2]].float()
    return None


def group_indices(member: torch.Tensor, m: int | None = None) -> torch.Tensor:
    """[B, kv] bool membership -> [B, m] left-aligned key indices with -1 padding (m = max count; read from
    the device unless given)."""
    kv = member.shape[1]
    if m is None:
        m = int(member.sum(1).max().item()) if member.numel() else 0
    if m == 0:
        return torch.full((member.shape[0], 1), -1, dtype=torch.long, device=member.device)
    ar = torch.arange(kv, device=member.device)
    key = torch.where(member, ar, kv + ar)
    order = key.argsort(dim=1)[:, :m]
    ok = member.gather(1, order)
    return torch.where(ok, order, -1)


def flops_grouped(q, k, groups) -> int:
    b, h, n, d = q.shape
    if isinstance(groups, torch.Tensor):  # membership: every group attends over all keys
        return 4 * b * h * n * k.shape[2] * d * groups.shape[0]
    return sum(4 * b * h * n * g.shape[1] * d for g in groups)


def reweighted_attention(
    q, k, v, mask, valid, scale, base, rows, groups, mix, skip=None, dense=False, memo=None, skip_mass=True
):
    """Attention where some query rows get their key-group masses edited.

    Every row first gets plain attention (the fast kernel; ``mask`` as the layer received it). Rows where
    ``rows`` [B, n] is True (or whose indices ``rows`` [B, R] lists, -1 padded) are then recomputed from
    per-group partial outputs O_g and masses m_g: ``mix(outs, masses, row_index, v_heads)`` returns their
    new outputs [B, H, R, d] (float32), where the unedited answer would be sum_g m_g O_g. No attention
    matrix is formed for the other rows. ``skip``: a group whose output ``mix`` does not read; when the
    plain attention's kernel also gives each row's LSE (``dense``: causal over every key, no padding), that
    group is not attended (its mass is what the others leave; ``skip_mass`` False: ``mix`` does not read
    that mass, it is None). ``valid`` [B, kv]: the real keys. ``memo``: a dict the caller keeps across
    layers with the same ``valid``, ``rows`` and ``groups``: the masks and indices made from them are
    made once for the same ``mask`` object (not per layer).
    Returns (output [B, n, H, d], FLOPs executed)."""
    b, h, n, d = q.shape
    kv = k.shape[2]
    if memo is None or "mask" not in memo or memo["mask"] is not mask or memo["dtype"] != q.dtype:
        memo = {} if memo is None else memo
        memo.clear()
        allowed = mask_to_bool(base, mask, valid, n, kv, b, q.device)
        ri = rows if rows.dtype == torch.long else group_indices(rows)  # [B, R] edited rows, -1 padding
        safe = ri.clamp(min=0)
        allowed_r = allowed.gather(2, safe[:, None, :, None].expand(-1, allowed.shape[1], -1, kv))
        memo.update(mask=mask, dtype=q.dtype, allowed=allowed, ri=ri, safe=safe, allowed_r=allowed_r)
        memo.update(real=(ri >= 0)[:, None, :, None], groups={})
    allowed, ri, safe, allowed_r = memo["allowed"], memo["ri"], memo["safe"], memo["allowed_r"]
    kk, vv = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // v.shape[1])
    fused = attention_with_lse(q, kk, vv, scale) if skip is not None and base == "sdpa" and dense else None
    lse_all = None
    if fused is not None:
        out, lse_all = fused
    else:
        out = plain_attention(q, kk, vv, allowed, scale, base, masked=mask is not None)
    q_r = q.gather(2, safe[:, None, :, None].expand(-1, h, -1, d))
    total = None if lse_all is None else lse_all.gather(2, safe[:, None, :].expand(-1, h, -1))
    # membership groups attend every key: hand them the heads repeated above (index groups gather first)
    gk, gv = (kk, vv) if isinstance(groups, torch.Tensor) else (k, v)
    math_only = base == "eager"
    outs, masses = grouped_attention(
        q_r, gk, gv, allowed_r, groups, scale, math_only, total, skip, memo["groups"], skip_mass
    )
    new = mix(outs, masses, ri, vv)
    idx = safe[:, None, :, None].expand(-1, h, -1, d)
    new = torch.where(memo["real"], new.to(out.dtype), out.gather(2, idx))
    # ``out`` is the kernel's own: written in place (no copy of every row) unless autograd needs it
    out = out.scatter(2, idx, new) if out.requires_grad else out.scatter_(2, idx, new)
    attended = groups
    if not isinstance(groups, torch.Tensor):
        attended = [g for i, g in enumerate(groups) if not (total is not None and i == skip)]
    flops = 4 * b * h * n * kv * d + flops_grouped(q_r, k, attended)
    return out.transpose(1, 2).contiguous(), flops
