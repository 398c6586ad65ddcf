"""Aten ops of a call and an estimate of the bytes each reads and writes, from tensor sizes (issue 17).

``OpCost`` is a TorchDispatchMode: inside it every aten op other than views (which launch nothing) is
counted with its shapes. Bytes are estimated, not measured: an op reads each tensor argument's footprint
(its elements, a dimension of stride 0 counted once: an expanded index is read as the small tensor it
is) and writes its outputs' footprint; ``gather`` / ``index_select`` read only the rows they return (the
output's size) plus the index, not the whole source. A kernel that re-reads or caches differently moves
the real number; what this shows is which ops touch O(context) bytes. Works on ``meta`` tensors: the
real shapes without the memory or the compute.

    with OpCost() as cost:
        fn()
    cost.ops, cost.read, cost.written, cost.table()
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# a Python number handed to an op becomes a 0-dim host tensor; _unsafe_view reshapes without a copy
NO_LAUNCH = {"aten.scalar_tensor.default", "aten._unsafe_view.default"}
# ops that take a tensor for its dtype / device / shape only: they read nothing
NO_READ = {f"aten.{n}.default" for n in ("new_full", "new_zeros", "new_ones", "new_empty", "empty_like")}
# ops that read only the rows they return, plus their index
ROW_READS = {"aten.gather.default", "aten.index_select.default", "aten.embedding.default"}


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses (stride-0 dimensions once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from tensors(y)


class OpCost(TorchDispatchMode):
    """Counts non-view aten ops and estimates their bytes (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.rows: list = []  # (op, read bytes, written bytes, output shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if func.is_view or name in NO_LAUNCH:
            return out
        outs = list(tensors(out))
        written = sum(footprint(t) for t in outs)
        inputs = list(tensors(args)) + list(tensors(list(kwargs.values())))
        if name in NO_READ:
            read = 0
        elif name in ROW_READS:
            index = inputs[-1]  # gather(src, dim, index), index_select(src, dim, index), embedding(w, idx)
            read = written + footprint(index)
        else:  # in place ops included: self is read once and written once
            read = sum(footprint(t) for t in inputs)
        shape = tuple(outs[0].shape) if outs else ()
        self.rows.append((name.replace("aten.", "").replace(".default", ""), read, written, shape))
        return out

    @property
    def ops(self) -> int:
        return len(self.rows)

    @property
    def read(self) -> int:
        return sum(r[1] for r in self.rows)

    @property
    def written(self) -> int:
        return sum(r[2] for r in self.rows)

    def summary(self) -> dict:
        """ops, bytes read / written, and the ops moving the most bytes (with their output shapes)."""
        by = collections.OrderedDict()
        for name, r, w, shape in self.rows:
            key = f"{name} {list(shape)}"
            n, rr, ww = by.get(key, (0, 0, 0))
            by[key] = (n + 1, rr + r, ww + w)
        top = sorted(by.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))
        return dict(
            ops=self.ops,
            read_bytes=self.read,
            written_bytes=self.written,
            top=[dict(op=k, count=n, read_bytes=r, written_bytes=w) for k, (n, r, w) in top[:8]],
        )

    def table(self) -> str:
        """Markdown: one row per op, in call order."""
        lines = ["| # | op | output shape | read MB | written MB |", "|---|---|---|---|---|"]
        for i, (name, r, w, shape) in enumerate(self.rows, 1):
            lines.append(f"| {i} | {name} | {list(shape)} | {r / 1e6:.3f} | {w / 1e6:.3f} |")
        lines.append(
            f"| | **total: {self.ops} ops** | | **{self.read / 1e6:.1f}** | **{self.written / 1e6:.1f}** |"
        )
        return "\n".join(lines)
