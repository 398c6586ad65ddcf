"""Low-bit storage of the KVSink cache: packed integers per quantization group, sinks in full precision.

2 and 4 bits go through optimum-quanto (``MaxOptimizer`` + ``quantize_weight``: asymmetric min-max,
packed two / four values per byte), one quanto row per group: keys per channel over ``group_size``
tokens, values per token over ``group_size`` channels. quanto has no asymmetric grouped 8-bit type
(its ``qint8`` is symmetric, per axis), so 8 and 16 bits are stored here by hand (uint8 / int32 codes,
a scale and a minimum per group). Why not transformers' ``QuantizedCache`` (which wraps the same
backends): its axes are 0 / -1 of the whole [B, H, T, D] tensor (no per-channel keys over token groups),
it re-quantizes the whole cache at every flush, groups by slot (left padding moves them), and has no
way to leave sinks out of the scales or keep them exact.

Per layer and sample (``Part``): the quantized groups (chunks in rank order), the full-precision tail
(tokens of the incomplete group), and the sinks of quantized groups (their ranks and exact keys /
values). Sinks are left out of the key scales (their entries take the group's smallest non-sink value
before quantizing) and written back exactly after dequantizing. The attention input is assembled per
forward (as ``QuantizedCache`` does), left-padded like the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer


def affine(rows: torch.Tensor, bits: int):
    """(codes [N, g], scale [N, 1], offset [N, 1]) of rows [N, g] (one group each), asymmetric min-max: the
    rule both ``generate``'s store and ``generate_fast``'s (``mmsink.kv.fast_quant``) run. Plain tensor
    ops, no host sync. 2 / 4 bits: quanto's optimizer and quantizer (offset: its shift, minus the
    minimum); 8 / 16 bits by hand (offset: the minimum)."""
    if bits in (2, 4):
        from optimum.quanto import MaxOptimizer, qint2, qint4

        g = rows.shape[1]
        scale, shift = MaxOptimizer()(rows, qint4 if bits == 4 else qint2, 0, g)
        return torch.ops.quanto.quantize_affine(rows, bits, 0, g, scale, shift), scale, shift
    x = rows.float()
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-12)
    q = ((x - lo) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8 if bits == 8 else torch.int32)
    return q, scale.to(rows.dtype), lo.to(rows.dtype)


def decode(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, dtype) -> torch.Tensor:
    """The values of ``affine``'s codes (2 / 4 bits: as quanto's ``dequantize()`` computes)."""
    if bits in (2, 4):
        return (scale * q - offset).to(dtype)
    return (q.float() * scale.float() + offset.float()).to(dtype)


def pack(rows: torch.Tensor, bits: int):
    """Quantize rows [N, g] (one group each): 2 / 4 bits packed by quanto, else (codes, scale, offset)."""
    return stored_of(*affine(rows, bits), bits)


def stored_of(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int):
    """``affine``'s (codes [N, g], scale, offset) as stored: 2 / 4 bits packed by quanto."""
    if bits in (2, 4):
        from optimum.quanto import WeightQBitsTensor, qint2, qint4

        # the plain packed layout (quantize_weight's optimized=False: no TinyGemm layout for bf16 / 128)
        qtype = qint4 if bits == 4 else qint2
        return WeightQBitsTensor(qtype, 0, q.shape[1], q.size(), (q.shape[1], 1), q, scale, offset)
    return q, scale, offset


def unpack(stored, dtype) -> torch.Tensor:
    if isinstance(stored, tuple):
        return decode(*stored, 8, dtype)
    return dequantize(stored).to(dtype)


def triple(stored, bits: int):
    """(codes, scale, offset) of a stored group set (``affine``'s form, codes unpacked)."""
    if isinstance(stored, tuple):
        return stored
    return codes(stored._data._data, bits, stored.shape[0]), stored._scale, stored._shift


def codes(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """The uint8 codes of quanto's packed rows: row block i of the codes sits in bits [i * bits, (i + 1) *
    bits) of each byte. By hand because quanto's CUDA unpack is a C++ extension compiled on first use
    (ninja and nvcc, minutes), which a GPU machine without a compiler cannot run."""
    mask = 2**bits - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)])[:rows]


def dequantize(stored) -> torch.Tensor:
    """A plain ``WeightQBitsTensor`` [N, g] (axis 0, one group per row), as its ``dequantize()`` computes."""
    q = codes(stored._data._data, stored._data.bits, stored.shape[0])
    shift = stored._shift
    if shift.dtype.is_floating_point:
        return decode(q, stored._scale, shift, stored._data.bits, stored._scale.dtype)
    return stored._scale * (q.to(torch.int8) - shift.to(torch.int8))


def stored_bytes(stored) -> int:
    if isinstance(stored, tuple):
        return sum(t.numel() * t.element_size() for t in stored)
    total = 0
    for t in (stored._data, stored._scale, stored._shift):
        inner = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else []
        parts = [getattr(t, n) for n in inner] if inner else [t]
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


@dataclass
class Chunk:
    """Groups quantized together: keys rows [H * n * D, g], values rows [H * n * g * (D / cg), cg]."""

    keys: object
    values: object
    tokens: int  # n * g

    def unpack(self, h: int, d: int, g: int, dtype):
        n, cg = self.tokens // g, min(g, d)
        k = unpack(self.keys, dtype).view(h, n, d, g).permute(0, 1, 3, 2).reshape(h, n * g, d)
        v = unpack(self.values, dtype).view(h, n * g, d // cg, cg).reshape(h, n * g, d)
        return k, v


@dataclass
class Part:
    """One sample's storage in one layer (rank order). Tensors are replaced, never edited in place, so
    beams may share a Part's tensors."""

    chunks: list = field(default_factory=list)
    tail_k: torch.Tensor | None = None  # [H, r, D] full precision, not yet quantized
    tail_v: torch.Tensor | None = None
    sink_rank: list = field(default_factory=list)  # ranks of exact sinks inside the chunks
    sink_k: list = field(default_factory=list)  # [H, D] each
    sink_v: list = field(default_factory=list)

    def copy(self) -> Part:
        return Part(list(self.chunks), self.tail_k, self.tail_v, *(list(x) for x in self.sinks()))

    def sinks(self):
        return self.sink_rank, self.sink_k, self.sink_v


def key_rows(k: torch.Tensor, sink: torch.Tensor, g: int) -> torch.Tensor:
    """Keys [..., n, D] as quantization rows [..., n/g, D, g] (a channel over a group of tokens), the
    ``sink`` [..., n] (broadcast) entries set to their row's smallest non-sink value: sinks out of the
    scales (they are kept exact elsewhere)."""
    n = k.shape[-2]
    rows = k.unflatten(-2, (n // g, g)).transpose(-1, -2)
    mask = sink.unflatten(-1, (n // g, g))[..., None, :]
    floor = torch.where(mask, float("inf"), rows.float()).amin(-1, keepdim=True)
    floor = torch.where(torch.isfinite(floor), floor, 0).to(rows.dtype)
    return torch.where(mask, floor, rows)


def seal(part: Part, n: int, sink: torch.Tensor, g: int, bits: int, at: list | None = None) -> None:
    """Quantize the first ``n`` tail tokens (whole groups) of ``part``; ``sink`` [n] bool: kept exact (``at``:
    its True positions, when the caller read them already)."""
    k, v = part.tail_k[:, :n], part.tail_v[:, :n]
    h, _, d = k.shape
    done = sum(c.tokens for c in part.chunks)
    for j in sink.nonzero()[:, 0].tolist() if at is None else at:
        part.sink_rank.append(done + j)
        part.sink_k.append(k[:, j].clone())  # copies: a view would keep the whole tail's storage alive
        part.sink_v.append(v[:, j].clone())
    rows = key_rows(k, sink, g)
    cg = min(g, d)
    vrows = v.reshape(h * n * (d // cg), cg)
    part.chunks.append(Chunk(pack(rows.reshape(-1, g), bits), pack(vrows, bits), n))
    part.tail_k, part.tail_v = part.tail_k[:, n:].clone(), part.tail_v[:, n:].clone()


SEAL_TOKENS = 8192  # tokens sealed together by ``seal_all`` (its temporaries are a few times their bytes)


def seal_all(parts: list, plan: list, g: int, bits: int, memo: dict | None = None) -> None:
    """``seal`` of every sample of a layer (``plan``: per part (n, sink [n], sink positions)), with one
    ``key_rows`` / ``affine`` over the batch's rows: rows are quantized independently (per-row minimum and
    maximum, elementwise codes), so each sample's codes are bitwise ``seal``'s. Rows go sample by sample
    (each sample's in ``seal``'s order), so a sample's codes are a contiguous run. ``memo``: what the
    layers of one forward share (per run of samples and device: the sink flags as rows, the exact sinks'
    row index)."""
    todo = [(p, n, sink, at) for p, (n, sink, at) in zip(parts, plan, strict=True) if n]
    memo = {} if memo is None else memo
    runs, run, size = [], [], 0  # samples in runs of up to SEAL_TOKENS tokens: bounded temporaries
    for x in todo:
        if run and size + x[1] > SEAL_TOKENS:
            runs.append(run)
            run, size = [], 0
        run.append(x)
        size += x[1]
    runs += [run] if run else []
    for r, run in enumerate(runs):
        if len(run) == 1:
            p, n, sink, at = run[0]
            seal(p, n, sink.to(p.tail_k.device), g, bits, at)
        else:
            seal_run(run, g, bits, memo.setdefault((r, run[0][0].tail_k.device), {}))


def seal_run(todo: list, g: int, bits: int, memo: dict) -> None:
    """``seal_all``'s batched quantization of one run of samples."""
    h, _, d = todo[0][0].tail_k.shape
    dev, cg = todo[0][0].tail_k.device, min(g, d)
    # [sum over samples of H * n, D]: sample, head, rank
    k = torch.cat([p.tail_k[:, :n].reshape(h * n, d) for p, n, _, _ in todo])
    v = torch.cat([p.tail_v[:, :n].reshape(h * n, d) for p, n, _, _ in todo])
    if not memo:
        memo["mask"] = torch.cat([s.to(dev).expand(h, -1).reshape(-1, g) for _, _, s, _ in todo])
        rows, lo = [], 0  # the exact sinks' rows in k, sink by sink, head by head
        for _, n, _, at in todo:
            rows += [lo + i * n + j for j in at for i in range(h)]
            lo += h * n
        memo["rows"] = torch.tensor(rows, dtype=torch.long, device=dev)
    mask, rows = memo["mask"], memo["rows"]
    kq = affine(key_rows(k.view(-1, g, d), mask, g).reshape(-1, g), bits)
    vq = affine(v.view(-1, cg), bits)
    exact_k, exact_v = (x.index_select(0, rows).view(-1, h, d) for x in (k, v))
    lo = e = 0
    for p, n, _, at in todo:
        kr, vr = lo * d // g, lo * d // cg  # the sample's first key / value row
        keys = [x[kr : kr + h * n * d // g] for x in kq]
        vals = [x[vr : vr + h * n * d // cg] for x in vq]
        done = sum(c.tokens for c in p.chunks)
        for j in at:
            p.sink_rank.append(done + j)
            p.sink_k.append(exact_k[e])
            p.sink_v.append(exact_v[e])
            e += 1
        p.chunks.append(Chunk(stored_of(*keys, bits), stored_of(*vals, bits), n))
        p.tail_k, p.tail_v = p.tail_k[:, n:].clone(), p.tail_v[:, n:].clone()
        lo += h * n


def assemble(part: Part, g: int, dtype):
    """[H, n, D] keys and values of the sample, in rank order."""
    h, _, d = part.tail_k.shape
    ks, vs = [], []
    for c in part.chunks:
        k, v = c.unpack(h, d, g, dtype)
        ks.append(k)
        vs.append(v)
    k, v = torch.cat(ks + [part.tail_k], 1), torch.cat(vs + [part.tail_v], 1)
    if part.sink_rank:
        at = torch.tensor(part.sink_rank, device=k.device)
        k, v = (
            k.index_copy(1, at, torch.stack(part.sink_k, 1)),
            v.index_copy(1, at, torch.stack(part.sink_v, 1)),
        )
    return k, v


def picked(valid: torch.Tensor):
    """(flat index [N] of ``valid`` [B, q]'s True slots in sample-major order, their count per sample): one
    host read for the batch."""
    counts = valid.sum(1).tolist()
    return valid.flatten().nonzero()[:, 0], counts


class QuantLayer(DynamicLayer):
    """A cache layer that stores per sample (``parts``) and hands attention the assembled keys / values
    [B, H, T, D], slots as the cache's ``valid`` (left-padded; padding slots are zeros)."""

    def put(self, key_states, value_states, valid, g: int, pick=None):
        """Append the forward's valid tokens to each sample's tail; the attention input [B, H, T, D].
        ``pick``: (flat index of the valid [B, q] slots, their count per sample), shared by the layers."""
        b, h, q, d = key_states.shape
        fresh = not self.is_initialized
        if fresh:
            self.lazy_initialization(key_states, value_states)
            empty = key_states.new_zeros(h, 0, d)
            self.parts = [Part(tail_k=empty, tail_v=empty) for _ in range(b)]
        if pick is None:
            pick = picked(valid[:, -q:])
        at, counts = pick
        at = at.to(key_states.device)
        for src, name in ((key_states, "tail_k"), (value_states, "tail_v")):
            # one gather of the valid tokens for all samples, split per sample ([H, n_b, D] views)
            new = src.transpose(1, 2).flatten(0, 1).index_select(0, at).split(counts)
            for p, x in zip(self.parts, new, strict=True):
                old, x = getattr(p, name), x.transpose(0, 1)
                setattr(p, name, x if old.shape[1] == 0 else torch.cat([old, x], 1))
        if fresh and valid.shape[1] == q:  # nothing stored before: the input itself, padding zeroed
            mask = valid.to(key_states.device)[:, None, :, None]
            return torch.where(mask, key_states, 0), torch.where(mask, value_states, 0)
        return self.full(valid, g)

    def full(self, valid, g: int):
        b, t = valid.shape
        h, d = self.parts[0].tail_k.shape[0], self.parts[0].tail_k.shape[2]
        dev, dtype = self.parts[0].tail_k.device, self.dtype
        keys = torch.zeros(b, h, t, d, dtype=dtype, device=dev)
        values = torch.zeros_like(keys)
        valid = valid.to(dev)
        for i, p in enumerate(self.parts):
            k, v = assemble(p, g, dtype)
            keys[i][:, valid[i]] = k
            values[i][:, valid[i]] = v
        return keys, values

    def nbytes(self) -> int:
        """Bytes held: packed groups with their scales, full-precision tails and sinks."""
        total = 0
        for p in self.parts:
            total += sum(stored_bytes(c.keys) + stored_bytes(c.values) for c in p.chunks)
            for t in [p.tail_k, p.tail_v, *p.sink_k, *p.sink_v]:
                total += t.numel() * t.element_size()
        return total

    def get_seq_length(self) -> int:
        return max((p.tail_k.shape[1] + sum(c.tokens for c in p.chunks) for p in self.parts), default=0)

    def reorder_cache(self, beam_idx) -> None:
        if self.is_initialized:
            self.parts = [self.parts[i].copy() for i in beam_idx.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.parts = [p.copy() for p in self.parts for _ in range(repeats)]

    def batch_select_indices(self, indices) -> None:
        if self.is_initialized:
            self.parts = [self.parts[i].copy() for i in torch.as_tensor(indices).tolist()]
