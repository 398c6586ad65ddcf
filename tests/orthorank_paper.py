"""A plain reference of OrthoRank's own form (Shin et al., ICML 2025) on an unwrapped model, that
``wrap(model, orthorank={...})`` (the plan-based form) is pinned to: in each chosen layer, every real token
is scored 1 - |cos(x_i, x_sink)| on the layer's input norm (sink: the first real token); the top
``ceil(ratio * n)`` are updated by the layer, the others leave it exactly as they entered. The layer still
runs on every token, so the others' keys and values are what the layer computes from their input: the
paper's semantics without its savings (``wrap(model, prune="orthorank", form="layers")`` has them).
``keep_last``: the prompt's last token is always updated (it predicts the next token; our choice) and
takes one of the ``ceil(ratio * n)`` places: the ``ceil(ratio * n) - 1`` best others join it. ``force``
([B, n] bool): tokens updated in addition (ViT sinks under ``sink_forward``)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def select(x: torch.Tensor, valid: torch.Tensor, ratio: float, keep_last: bool, norms=None) -> torch.Tensor:
    """[B, n] bool: per sample, the ceil(ratio * real) real tokens least aligned with the sink: the first
    real token, or (``norms`` [B, n], the states' norms) the real token of largest norm."""
    b, n, _ = x.shape
    out = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        real = valid[i].nonzero().flatten().tolist()
        sink = real[0] if norms is None else max(real, key=lambda t: (float(norms[i, t]), -t))
        scored = sorted((-(1 - abs(float(F.cosine_similarity(x[i, t], x[i, sink], dim=0)))), t) for t in real)
        k = math.ceil(ratio * len(real))
        if keep_last:
            out[i, real[-1]] = True
            scored = [(s, t) for s, t in scored if t != real[-1]]
            k -= 1
        for _, t in scored[:k]:
            out[i, t] = True
    return out


@contextmanager
def orthorank_layers(
    model,
    layers,
    ratio: float,
    attention_mask=None,
    keep_last: bool = True,
    log=None,
    sink: str = "first",
    force=None,
):
    """Within the block, layers ``layers`` of ``model``'s language model follow OrthoRank (prefill without
    cache). ``log``: a dict that receives {layer: (selected [B, n] bool, input [B, n, D])}. ``sink``:
    "first" (the first real token) or "max_norm" (the real token of largest ||h|| entering the layer)."""
    blocks = model.model.language_model.layers
    hooks = []
    for li in layers:
        blk = blocks[li]

        def pre(module, args, kwargs, li=li):
            h = args[0] if args else kwargs["hidden_states"]
            valid = (
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones(h.shape[:2], dtype=torch.bool)
            )
            x = module.input_layernorm(h).float()
            norms = h.float().norm(dim=-1) if sink == "max_norm" else None
            chosen = select(x, valid, ratio, keep_last, norms)
            module._orthorank = (chosen if force is None else chosen | (force & valid), h)

        def post(module, args, kwargs, output, li=li):
            chosen, h = module.__dict__.pop("_orthorank")
            out = output[0] if isinstance(output, tuple) else output
            new = torch.where(chosen[..., None], out, h)
            if log is not None:
                log[li] = (chosen, h)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        hooks.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(blk.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
