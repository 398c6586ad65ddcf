"""Whether ``torch.compile`` is used by default: on CUDA with Triton (Inductor's GPU backend). Elsewhere the
fast path and VAR run eagerly unless asked, since a CPU compile costs seconds for little gain."""

from __future__ import annotations

import torch


def can_compile(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
