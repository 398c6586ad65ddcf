"""Fewer kernels per decode step: options of ``generate_fast(..., step=StepOptions(...))``
(``evals/profile_decode.py`` measures them; ``default_options``: what ``step=None`` runs).

``fuse``: q / k / v as one GEMV and gate / up as one GEMV per layer. The weights are not copied: each
group's weights move into one concatenated tensor whose row slices become the modules' parameters (so the
model's own modules, which the prefill runs, read the same memory), and ``unfuse`` (run by
``mmsink.unwrap`` / ``mmsink.fast.clear``) gives each parameter its own storage back. Only the move costs
memory, one group at a time (the largest: gate + up of one layer).

``write``: one KV buffer per layer [2, B, kv_heads, slots, d] (keys and values are views of it), so the
new token's key and value go in with one write; the validity mask is set ahead for every slot after the
prompt and cut at the current slot by position in the step (``valid & (slot index <= slot)``), instead of
a separate write per step. A pruned layer's holes stay: they lie before the prompt's end.

``attn``: attention of the one-token query. "sdpa" (the plain step's), "matmul" (scores and output as
batched matmuls per KV head, a masked fp32 softmax between that the compiler fuses with the mask; the
scores come out of the matmul in the model's dtype, as in transformers' eager attention), or "reduce"
(scores and output as element-wise products summed in fp32: the compiler makes them reductions that
spread over many blocks, where SDPA's kernel gets one block per head at batch 1), or "kernel" (a Triton
kernel that also writes the new key, value and validity: ``mmsink.fast.decode_kernel``; its torch
reference on CPU; not with ``write``: its one write is the kernel's own).

``gemv`` (with ``fuse``): the fused q / k / v and gate / up GEMVs, and (in a layer whose gate / up are
fused) o_proj and down_proj with the residual's add where they are plain ``nn.Linear``, as a Triton GEMV
for batches of up to 4 rows (``mmsink.fast.gemv``: each weight tile read once for all rows, one kernel
per projection, no split-K reduce after o_proj and down_proj; the add rounds once where ``h + o_proj(o)``
rounds twice). Elsewhere (CPU, larger batches, quantized or adapted projections) the projections are
torch's as without it. On by default where Triton runs on CUDA (``MMSINK_GEMV_KERNEL=0`` turns it off;
``evals/gemv_speed.py`` and ``evals/profile_decode.py`` measure it).

VAR layers keep the plain step.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_kernel, gemv
from .decode import STORE, FastDecoder, finish, gated, grouped, split_heads, write_slot

FUSED = "_mmsink_fused"  # on the model: (layers, per layer {"qkv": (w, b), "gu": (w, b)}, stamp(layers))
ATTN = ("sdpa", "matmul", "reduce", "kernel")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    fuse: bool = False
    write: bool = False
    attn: str = "sdpa"
    gemv: bool = False

    def __post_init__(self):
        if self.attn not in ATTN:
            raise ValueError(f"mmsink: step attn must be one of {', '.join(ATTN)}, got {self.attn!r}")
        if self.write and self.attn == "kernel":
            raise ValueError("mmsink: step attn='kernel' writes the key, value and validity itself: no write")
        if self.gemv and not self.fuse:
            raise ValueError("mmsink: step gemv=True runs the fused step's projections: it needs fuse=True")

    @property
    def plain(self) -> bool:
        return self == StepOptions()


def options(step) -> StepOptions | None:
    """``generate_fast``'s ``step=``: None, a StepOptions or a dict of its fields; None when all are off."""
    if step is None:
        return None
    if isinstance(step, dict):
        known = [f.name for f in dataclasses.fields(StepOptions)]
        bad = set(step) - set(known)
        if bad:
            raise ValueError(f"mmsink: unknown step option(s) {sorted(bad)}; known: {', '.join(known)}")
        step = StepOptions(**step)
    if not isinstance(step, StepOptions):
        raise ValueError(f"mmsink: step= takes a StepOptions or a dict, got {type(step).__name__}")
    return None if step.plain else step


def default_options(step, fast_gpu: bool) -> StepOptions | None:
    """``options(step)``; ``step=None`` on ``fast_gpu`` (graphs and compile on one GPU) is the fused step
    (a default since tests/test_gpu_step_options.py passed on the H200; evals/results/gpu_next/h200 has
    the step's times), with the decode kernel's attention and the GEMV where Triton is there (each a
    default since its GPU tests passed and the step measured faster with it: parts 23 and 28)."""
    if step is None and fast_gpu:
        kernel = decode_kernel.available("cuda")
        return StepOptions(fuse=True, attn="kernel" if kernel else "sdpa", gemv=gemv.available("cuda"))
    return options(step)


# ------------------------------------------------------------------------------ fused weights


def groups(layer) -> dict:
    """The layer's groups of projections that read the same input: {"qkv": (q, k, v), "gu": (gate, up)},
    each only where its modules are plain ``nn.Linear`` on one device and dtype, all with or all without
    bias (quantized or adapted projections keep their own step)."""
    attn, mlp = layer.self_attn, layer.mlp
    out = {}
    for name, parts in (("qkv", ("q_proj", "k_proj", "v_proj")), ("gu", ("gate_proj", "up_proj"))):
        mods = [getattr(attn if name == "qkv" else mlp, p, None) for p in parts]
        if not all(type(m) is nn.Linear for m in mods):
            continue
        ws = [m.weight for m in mods]
        if len({(w.device, w.dtype, w.shape[1]) for w in ws}) != 1 or ws[0].device.type == "meta":
            continue
        if len({m.bias is None for m in mods}) != 1:
            continue
        out[name] = mods
    if "gu" in out and not callable(getattr(mlp, "act_fn", None)):
        del out["gu"]
    return out


def aliased(mods, joint) -> bool:
    """Whether each module's weight (and bias) is still its row slice of the joint tensors."""
    w, b = joint
    row = 0
    for m in mods:
        n = m.weight.shape[0]
        if m.weight.data_ptr() != w[row : row + n].data_ptr() or m.weight.shape != w[row : row + n].shape:
            return False
        if b is not None and (m.bias is None or m.bias.data_ptr() != b[row : row + n].data_ptr()):
            return False
        row += n
    return row == w.shape[0]


def join(mods):
    """Move the modules' weights (and biases) into one tensor each; the parameters become its slices."""
    w = torch.cat([m.weight.detach() for m in mods])
    b = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
    row = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(w[row : row + n], requires_grad=m.weight.requires_grad)
        if b is not None:
            m.bias = nn.Parameter(b[row : row + n], requires_grad=m.bias.requires_grad)
        row += n
    return w, b


PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj", "act_fn")))


def stamp(layers) -> tuple:
    """Each projection module (and the MLP's activation) of every layer, with its weight's and bias's
    addresses, read from the modules' own dicts: ``fused`` runs on every prefill, and a full check there
    (module attribute lookups, a slice per weight) costs more host time than the prefill's GPU work after
    a selection. Replacing a module, a weight or its storage changes it."""
    out = []
    for layer in layers:
        for part, names in PROJECTIONS:
            parent = layer._modules.get(part)
            found = parent.__dict__ if parent is not None else {}
            subs = found.get("_modules", {})
            for n in names:
                m = subs.get(n, found.get(n))
                ps = getattr(m, "_parameters", None) or {}
                w, b = ps.get("weight"), ps.get("bias")
                weight = None if w is None else (w.data_ptr(), w.shape)
                out.append((m, weight, None if b is None else b.data_ptr()))
    return tuple(out)


def fused(model, layers) -> list:
    """Per layer the joint tensors ({"qkv": (w, b), "gu": (w, b)}), made (or made again where a weight or
    module was replaced since) on first use. Making any drops the model's decoders: their graphs read the
    old addresses."""
    kept = model.__dict__.get(FUSED)
    now_stamp = stamp(layers)
    if kept is not None and kept[2] == now_stamp:
        return kept[1]
    joints = kept[1] if kept is not None and len(kept[1]) == len(layers) else [{} for _ in layers]
    now = [groups(layer) for layer in layers]
    if kept is not None and all(
        set(j) == set(g) and all(aliased(mods, j[name]) for name, mods in g.items())
        for j, g in zip(joints, now)
    ):
        model.__dict__[FUSED] = (kept[0], joints, now_stamp)
        return joints
    model.__dict__.pop(STORE, None)
    out = []
    with torch.no_grad():
        for j, g in zip(joints, now):
            out.append({n: j[n] if n in j and aliased(mods, j[n]) else join(mods) for n, mods in g.items()})
    model.__dict__[FUSED] = (list(layers), out, stamp(layers))
    return out


def unfuse(model) -> None:
    """Give every fused parameter its own storage again (the joint tensors are freed group by group)."""
    kept = model.__dict__.pop(FUSED, None)
    if kept is None:
        return
    model.__dict__.pop(STORE, None)  # decoders' graphs read the joint tensors
    with torch.no_grad():
        for layer, j in zip(*kept[:2]):
            for name, mods in groups(layer).items():
                if name not in j or not aliased(mods, j[name]):
                    continue  # replaced since: already its own storage
                for m in mods:
                    m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
                    if m.bias is not None:
                        m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
                del j[name]


# ------------------------------------------------------------------------------ the step


def attend(q, kb, vb, mask, scale: float, how: str):
    """Attention of ``q`` [B, H, 1, d] over ``kb`` / ``vb`` [B, KVH, S, d] where ``mask`` [B, S] (bool)."""
    b, h, _, d = q.shape
    kvh = kb.shape[1]
    if how == "sdpa":
        return F.scaled_dot_product_attention(
            q, kb, vb, attn_mask=mask[:, None, None, :], scale=scale, **grouped(h, kvh)
        )
    g = q.view(b, kvh, h // kvh, d)  # head i reads KV head i // (h // kvh)
    if how == "matmul":
        s = torch.matmul(g, kb.transpose(-1, -2)).float() * scale  # [B, KVH, G, S]
    else:
        s = (g.float()[:, :, :, None, :] * kb.float()[:, :, None]).sum(-1) * scale
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    if how == "matmul":
        o = torch.matmul(p.to(vb.dtype), vb)
    else:
        o = (p[..., None] * vb.float()[:, :, None]).sum(-2).to(vb.dtype)
    return o.reshape(b, h, 1, d)


def written(kv, ok, k, v, slot, joint: bool):
    """The new token's key and value written at ``slot``: (keys, values, valid mask) to attend over."""
    if joint:
        kv.index_copy_(3, slot, torch.stack([k, v]))
        return kv[0], kv[1], ok & (torch.arange(ok.shape[1], device=ok.device) <= slot)
    kb, vb = kv
    write_slot(kb, vb, ok, k, v, slot)
    return kb, vb, ok


def make_step(opts: StepOptions):
    """The one-token layer step with ``opts`` (the arithmetic of ``decode.layer_step`` otherwise).
    ``x``: ``h`` through the layer's input norm; returns the new ``h`` and it through ``nxt`` (the next
    layer's input norm, so the residual's add and that norm are one kernel). ``kv``: the layer's joint
    buffer when ``opts.write``, else (keys, values), with ``attn="kernel"`` (keys, values, the kernel's
    lock); ``ok``: its validity (with ``write`` set ahead past the prompt); ``rope``: None where the
    decode kernel rotates q and k; ``joint``: the layer's fused tensors ({} where not fused)."""

    linear = gemv.linear if opts.gemv else F.linear

    def residual(h, m, x):  # h + m(x), the add in the GEMV where it runs
        if opts.gemv and type(m) is nn.Linear:
            return gemv.linear(x, m.weight, m.bias, residual=h)
        return h + m(x)

    def step(layer, nxt, h, x, cos, sin, kv, ok, start, t, heads: int, rope, joint):
        attn = layer.self_attn
        b, n, _ = h.shape
        q, k, v = split_heads(attn, x, heads, joint, linear)
        if rope is not None:
            q, k = rope(q, k, cos, sin)
        if opts.attn == "kernel":  # writes the key, value and validity itself; kv: (keys, values, lock)
            kb, vb, lock = kv
            o = decode_kernel.attend(
                q, k, v, kb, vb, ok, start, t, attn.scaling, None if rope else (cos, sin), lock
            )
        else:
            kb, vb, mask = written(kv, ok, k, v, (start + t).view(1), opts.write)
            o = attend(q, kb, vb, mask, attn.scaling, opts.attn)
        if "gu" not in joint:
            h = finish(layer, h, o)
        else:
            h = residual(h, attn.o_proj, o.transpose(1, 2).reshape(b, n, -1))
            act = gated(layer.mlp, layer.post_attention_layernorm(h), joint["gu"], linear)
            h = residual(h, layer.mlp.down_proj, act)
        return h, nxt(h)

    return step


def norm(module, h):
    """A layer's input norm where no step before gave it (the first layer, one after a VAR layer)."""
    return module(h)


class StepDecoder(FastDecoder):
    """``FastDecoder`` whose layer step takes ``StepOptions`` (VAR layers keep the plain step)."""

    def __init__(self, family, caps, batch, max_new, eos, compile=False, var=None, opts=None):
        super().__init__(family, caps, batch, max_new, eos, compile, var)
        self.opts = opts or StepOptions()
        self.joint = fused(family.model, self.layers) if self.opts.fuse else [{} for _ in self.layers]
        self.kv = [None] * len(self.layers)
        if self.opts.write:
            for i in range(len(self.layers)):
                if i in self.codes:
                    continue
                kv = torch.zeros((2, *self.k[i].shape), dtype=self.k[i].dtype, device=self.k[i].device)
                self.k[i], self.v[i], self.kv[i] = kv[0], kv[1], kv
        fn = make_step(self.opts)
        self.opt_fn = torch.compile(fn, dynamic=True) if compile else fn
        self.norm_fn = torch.compile(norm, dynamic=True) if compile else norm
        # the decode kernel's counts per sample and query head, one per device (it leaves them at zero)
        self.lock = {}
        if self.opts.attn == "kernel":
            self.lock = {
                kb.device: torch.zeros(batch * self.heads, dtype=torch.int32, device=kb.device)
                for kb in self.k
            }
        # the decode kernel rotates q and k where the model's rotation has its form
        self.step_rope = (
            None if self.opts.attn == "kernel" and decode_kernel.standard_rope(self.rope) else self.rope
        )

    def open(self, lengths: list[int]) -> None:
        super().open(lengths)
        if self.opts.write:  # every slot after the prompt: valid once written (the step cuts at its slot)
            for i, ok in enumerate(self.valid):
                if self.kv[i] is not None:
                    ok |= torch.arange(ok.shape[1], device=ok.device) >= self.start[i]

    def layers_op(self, lo: int, hi: int, h, cos, sin, t):
        x = None  # h through layer i's input norm, from the step before
        for i in range(lo, hi):
            if i in self.codes:  # VAR: the plain step
                h, x = super().layers_op(i, i + 1, h, cos, sin, t)[0], None
                continue
            kb = self.k[i]
            dev = kb.device
            h = h.to(dev)
            layer = self.layers[i]
            if x is None:
                x = self.norm_fn(layer.input_layernorm, h)
            # the next layer's input norm where it runs our step on this device; else the layer's own, unread
            same = i + 1 < hi and i + 1 not in self.codes and self.k[i + 1].device == dev
            nxt = self.layers[i + 1] if same else layer
            kv = self.kv[i] if self.opts.write else (kb, self.v[i])
            if self.lock:  # the decode kernel's
                kv += (self.lock[dev],)
            h, x = self.opt_fn(
                layer,
                nxt.input_layernorm,
                h,
                x,
                cos.to(dev),
                sin.to(dev),
                kv,
                self.valid[i],
                self.start[i],
                t.to(dev),
                self.heads,
                self.step_rope,
                self.joint[i],
            )
            x = x if same else None
        return h, cos, sin, t
