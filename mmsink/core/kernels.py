"""What the Triton kernels share (``mmsink.fast.decode_kernel``, ``mmsink.fast.gemv``,
``mmsink.kv.lfps_triton``, ``mmsink.core.received``): whether one runs on a device, and power-of-two block
sizes."""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # CPU-only installs: every kernel's torch path
    triton = None

# read when the kernels are defined: Triton's interpreter runs them on CPU tensors (the tests)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device, switch: str) -> bool:
    """Whether a kernel runs on ``device``: Triton importable and CUDA, or any device under the
    interpreter; never with the kernel's environment variable ``switch`` set to 0 (its torch path then
    runs, e.g. to compare)."""
    if triton is None or os.environ.get(switch) == "0":
        return False
    return torch.device(device).type == "cuda" or INTERPRET


def pow2(n: int, least: int = 1) -> int:
    """The smallest power of two >= ``n`` and >= ``least``."""
    return max(least, 1 << max(0, int(n) - 1).bit_length())
