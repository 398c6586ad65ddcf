"""The fast path: ``generate_fast`` (``generate``), static per-layer KV buffers and the one-token step
(``decode``), the decoders kept on a model (``store``), CUDA-graph plumbing (``graphs``) and the graphed
vision tower (``vision_graph``)."""

from .generate import generate_fast
from .store import clear

__all__ = ["generate_fast", "clear"]
