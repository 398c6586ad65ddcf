"""CUDA-graph plumbing shared by ``generate_fast`` (prefill tail, decode step) and the graphed vision
tower: capture, and the static inputs a replay reads (nested tuples of tensors and plain values)."""

from __future__ import annotations

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
