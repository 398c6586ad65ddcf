"""OrthoRank as a visual-token pruner (after Shin, Oh, Oh, "Token Selection via Sink Token Orthogonality
for Efficient LLM Inference", ICML 2025).

The paper's observation: with depth, the normalised hidden states of the tokens turn towards the sink
token's, whose own state barely changes; a token still orthogonal to the sink is one the layer has work
to do on. Its importance score, at the states entering layer K:

    s_i = 1 - |cos(x_i, x_sink)|,   x = layers[K].input_layernorm(h)  (the state the layer itself reads)

The sink is each sample's first real token (the start / system token that carries the attention sink in
LLaVA-1.5, LLaVA-NeXT and Qwen2-VL; left padding is skipped); ``sink="max_norm"`` takes instead the real
token of largest ||h|| entering layer K (for models whose sink sits on a later token, e.g. a delimiter).
Each image keeps its ``budget`` visual tokens of highest score (ties: the earlier token), text tokens are
never dropped, and layers K.. run on the kept tokens; the one decision is taken after layer K-1, as FastV's.

Known differences from the paper: the paper selects tokens of any kind in every layer from K on and lets
the others skip the layer (still visible as keys and values); this is its one-shot form on the visual
tokens, so that it sits beside the other pruners (same plan, same budgets, same FLOPs accounting).
Budget: visual tokens kept per image from layer K on (int), or a fraction of each image's tokens (ceil).
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.plan import layer_device
from .base import Pruner, budget_count, budget_tokens, register, topk_counts, topk_per_image


@register
class OrthoRank(Pruner):
    name = "orthorank"
    default_budget = 0.5

    @dataclasses.dataclass
    class Options:
        layer: int = 2  # K: tokens are scored on the states entering layer K and dropped from it on
        sink: str = "first"  # or "max_norm"

    def check_options(self):
        if isinstance(self.options.layer, bool) or not isinstance(self.options.layer, int):
            raise ValueError(f"mmsink: orthorank layer must be an int, got {self.options.layer!r}")
        if self.options.layer < 1:
            raise ValueError("mmsink: orthorank needs layer >= 1 (the sink's state forms in the layers)")
        if self.options.sink not in ("first", "max_norm"):
            raise ValueError(
                f"mmsink: orthorank sink must be 'first' or 'max_norm', got {self.options.sink!r}"
            )

    def check_model(self, num_layers):
        if self.options.layer >= num_layers:
            raise ValueError(
                f"mmsink: orthorank layer={self.options.layer} must be < the model's {num_layers} layers"
            )

    def final_layer(self, ctx):
        return self.options.layer

    def report(self, ctx):
        return {"orthorank": {"layer": self.options.layer, "sink": self.options.sink}}

    def after_layer(self, ctx, layer, hidden, observed):
        if layer != self.options.layer - 1:
            return
        score = orthogonality(ctx, self.options.layer, hidden, self.options.sink)
        chosen = topk_per_image(ctx, score, lambda orig, cur: budget_count(self.budget, orig), self.budget)
        ctx.decide(ctx.keep_text(chosen), counts=topk_counts(ctx, lambda o, c: budget_tokens(self.budget, o)))


def orthogonality(ctx, layer: int, hidden: torch.Tensor, which: str = "first") -> torch.Tensor:
    """[B, n] 1 - |cos(x_i, x_sink)| on ``layer``'s input norm of ``hidden`` (the current slots); the sink
    is each sample's first real slot, or (``which="max_norm"``) its real slot of largest ||h||."""
    block = ctx.lm.layers[layer]
    dev = layer_device(block)  # where the layer computes (accelerate-offloaded weights sit on meta)
    x = block.input_layernorm(hidden.to(dev)).float()
    b, n, d = x.shape
    valid = ctx.seg.valid.to(dev)
    if which == "max_norm":
        sink = hidden.to(dev).float().norm(dim=-1).masked_fill(~valid, -1.0).argmax(1)
    else:
        sink = valid.float().argmax(1)  # the first real slot (left padding before it)
    xs = x[torch.arange(b, device=dev), sink]  # [B, D]
    dots = torch.einsum("bnd,bd->bn", x, xs)
    ctx.extra_flops += 2 * b * n * d  # the dot products (norms are elementwise work, not counted)
    cos = dots / (x.norm(dim=-1) * xs.norm(dim=-1, keepdim=True)).clamp_min(1e-12)
    return (1 - cos.abs()).to(ctx.device)
