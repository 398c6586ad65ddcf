"""Whether ``torch.compile`` is used by default: on CUDA with Triton (Inductor's GPU backend). Elsewhere the
fast path and VAR run eagerly unless asked, since a CPU compile costs seconds for little gain."""

from __future__ import annotations

import warnings

import torch


def can_compile(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def compiler_errors() -> tuple:
    """What the compiler raises when it cannot compile (then the function runs eagerly); not runtime
    errors such as running out of memory."""
    import torch._dynamo.exc
    import torch._inductor.exc

    return (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError)


def or_eager(owner, compiled, eager, args, kwargs, what: str, hint: str):
    """``compiled(*args, **kwargs)``; when the compiler fails: ``owner.failed`` set, one warning naming
    ``what`` and how to skip the attempt (``hint``), and ``eager``'s result instead."""
    try:
        return compiled(*args, **kwargs)
    except Exception as e:
        if not isinstance(e, compiler_errors()):
            raise
        owner.failed = True
        warnings.warn(
            f"mmsink: {what} did not compile ({type(e).__name__}); eager from now on ({hint} skips "
            "the attempt)",
            stacklevel=3,
        )
        return eager(*args, **kwargs)
