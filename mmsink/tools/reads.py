"""Count the host reads of device values a piece of code makes (``.item()``, ``.tolist()``, ``bool(t)``,
``nonzero``, boolean indexing ...), with where they happen. On a GPU each one waits for the device to
drain its queue; counted on CPU tensors they show the same sites, so a test or a CPU profile can pin
how many a prefill makes."""

from __future__ import annotations

import collections
import contextlib
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

# calls whose result the host needs now (the output size, or the value itself)
READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.masked_select,
    torch.masked_select,
    torch.unique,
    torch.Tensor.unique,
}
TORCH_DIR = os.path.dirname(torch.__file__)


def is_read(func, args, kwargs) -> bool:
    if func in READS:
        return True
    if func is torch.Tensor.__getitem__:  # a boolean mask as index sizes the result from its values
        idx = args[1] if len(args) > 1 else None
        idx = idx if isinstance(idx, tuple) else (idx,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        reps = args[1] if len(args) > 1 else (kwargs or {}).get("repeats")
        return isinstance(reps, torch.Tensor) and (kwargs or {}).get("output_size") is None
    return False


def site() -> str:
    """file:line of the innermost caller outside torch."""
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith(TORCH_DIR):
        f = f.f_back
    return "?" if f is None else f"{f.f_code.co_filename}:{f.f_lineno}"


def on_accelerator(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type not in ("cpu", "meta") for a in args)


class DeviceReads(TorchFunctionMode):
    """``with DeviceReads() as r: ...`` then ``r.total`` and ``r.sites`` (a Counter of file:line).
    ``device_only``: count reads of accelerator tensors only (host tensors read for free); on a CPU run
    leave it off, and every read counts (host tensors by design included)."""

    def __init__(self, device_only: bool = False):
        super().__init__()
        self.device_only = device_only
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if is_read(func, args, kwargs) and (not self.device_only or on_accelerator(args)):
            self.sites[site()] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def outside(self, *parts: str) -> int:
        """Reads at sites whose path contains none of ``parts`` (e.g. count only the library's own)."""
        return sum(c for s, c in self.sites.items() if not any(p in s for p in parts))


@contextlib.contextmanager
def selection_hooks(pruner, wrap):
    """Run a pruner's selection step through ``wrap(fn, name)``: its hooks (``after_layer``,
    ``before_llm``, the vision-stage ``select``) and the attention edits its directives hand a layer
    (named ``layer L attention edit``), e.g. to count the reads or ops made inside them. The class's
    methods come back on exit."""
    names = [n for n in ("after_layer", "before_llm", "select") if hasattr(pruner, n)]
    real = {n: getattr(pruner, n) for n in names + ["directive"]}

    def directive(ctx, layer):
        d = real["directive"](ctx, layer)
        if d and d.get("reweight") is not None:
            d = dict(d, reweight=wrap(d["reweight"], f"layer {layer} attention edit"))
        return d

    for n in names:
        setattr(pruner, n, wrap(real[n], n))
    pruner.directive = directive
    try:
        yield
    finally:
        for n in real:
            delattr(pruner, n)
