"""The fast path: ``generate_fast`` (``generate``), static per-layer KV buffers and the one-token step
(``decode``), CUDA-graph plumbing (``graphs``) and the graphed vision tower (``vision_graph``)."""

from .decode import clear
from .generate import generate_fast

__all__ = ["generate_fast", "clear"]
