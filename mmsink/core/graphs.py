"""CUDA-graph plumbing shared by ``generate_fast`` (prefill tail, decode step), the graphed vision tower
and the pruners' selection loops (``Graphed``): capture, and the static inputs a replay reads (nested
tuples of tensors and plain values)."""

from __future__ import annotations

import collections
import contextlib
import warnings
import weakref

import torch


def capture(fn):
    """Warm ``fn`` up on a side stream, capture it as a CUDA graph: (its outputs, replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # torch's default capture stream is made once, on the device current at the first capture: capturing
    # for another GPU (a model split over GPUs) needs a stream of that GPU
    with torch.cuda.graph(graph, stream=side):
        out = fn()
    return out, graph.replay


def signature(x):
    """What a captured graph is specific to: tensor shapes, dtypes and devices; other values as such."""
    if isinstance(x, torch.Tensor):
        return ("t", tuple(x.shape), x.dtype, str(x.device))
    return tuple(signature(v) for v in x) if isinstance(x, tuple) else repr(x)


def static(x):
    """A copy of ``x`` whose tensors the graph owns (tuples followed; other values kept)."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    return tuple(static(v) for v in x) if isinstance(x, tuple) else x


def load(dst, src) -> None:
    """Copy ``src``'s tensors into the static ``dst`` of the same structure."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, tuple):
        for d, s in zip(dst, src):
            load(d, s)


def loaded(marks: dict, args) -> None:
    """Note which tensor (weakly held) and which version of it each input position of a graph now holds;
    an inference tensor has no version counter: it is noted as unknown (copied every time)."""
    for i, t in enumerate(tensors(args)):
        marks[i] = None if t.is_inference() else (weakref.ref(t), t._version)


def tensors(x) -> list:
    """Every tensor in ``x`` (tuples followed)."""
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for v in x for t in tensors(v)] if isinstance(x, tuple) else []


def is_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def on_cuda(x) -> bool:
    """Some tensor in ``x`` (tuples followed) and every one of them on a CUDA device (tuples of plain
    values, such as a round plan of ints, do not count)."""
    found = tensors(x)
    return bool(found) and all(map(is_cuda, found))


class Graphed:
    """``fn`` (tensors and plain values in, tensors out, no host reads or host-built tensors inside)
    replayed as a CUDA graph, one per input signature (shapes, dtypes, plain values; the ``keep`` last
    used): a selection loop of hundreds of small kernels becomes one launch. Eager where no graph can be
    made: off CUDA, inside another capture or a compile, after a capture failed (warned once). The result
    is a copy (the next replay rewrites the graph's own outputs). ``capture``: the capture function
    (default: this module's ``capture`` at the call; stand-ins in CPU tests and evals/selection_ops.py)."""

    def __init__(self, fn, keep: int = 4, capture=None, reuse: bool = False, own: tuple = ()):
        self.fn, self.keep, self.capture = fn, keep, capture
        # ``reuse``: ``fn`` writes none of its inputs, so an input that is the tensor last loaded into its
        # graph and unchanged since (same object, same version counter) is not copied again. ``own``: the
        # positions of ``fn``'s (tuple) result handed out as the graph's own tensors, not copies: the caller
        # is done with them before the next call, which rewrites them
        self.reuse, self.own = reuse, own
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.failed = False

    def usable(self, args) -> bool:
        return (
            not self.failed
            and on_cuda(args)
            and not torch.compiler.is_compiling()
            and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
        )

    def __call__(self, *args):
        if not self.usable(args):
            return self.fn(*args)
        dev = tensors(args)[0].device
        # a model split over GPUs: the capture's stream and pool on the inputs' GPU
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            return self.replayed(args)

    def replayed(self, args):
        key = signature(args)
        hit = self.graphs.get(key)
        if hit is None:
            ins = static(args)
            try:
                out, replay = (self.capture or capture)(lambda: self.fn(*ins))
            except RuntimeError as e:  # an op that cannot be captured: the same result eagerly
                self.failed = True
                name = getattr(self.fn, "__name__", "selection")
                warnings.warn(f"mmsink: {name}: no CUDA graph ({e}); eager from now on", stacklevel=2)
                return self.fn(*args)
            hit = self.graphs[key] = (ins, out, replay, {})
            if self.reuse:
                loaded(hit[3], args)  # ``ins`` are copies of these
            while len(self.graphs) > self.keep:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        ins, out, replay, marks = hit
        if self.reuse:
            for i, (dst, src) in enumerate(zip(tensors(ins), tensors(args))):
                mark = marks.get(i)
                if mark is None or mark[0]() is not src or mark[1] != src._version:
                    dst.copy_(src)
            loaded(marks, args)
        else:
            load(ins, args)
        replay()
        if self.own:
            return tuple(o if i in self.own else static(o) for i, o in enumerate(out))
        return static(out)
