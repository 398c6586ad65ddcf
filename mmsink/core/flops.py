"""FLOPs as executed: 2 per multiply-add of every matmul, the same convention as
``torch.utils.flop_counter``. Norms, softmax and elementwise work are not counted (neither are they there)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def linear_params(module: nn.Module) -> int:
    """Sum of in*out over the Linear layers of a module (each token passes each once)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def attention_flops(batch: int, heads: int, n_q: int, n_kv: int, head_dim: int) -> int:
    return 4 * batch * heads * n_q * n_kv * head_dim


@dataclass
class DecoderCost:
    layer_linear: list[int]  # per layer, in*out summed over its linears
    heads: int
    head_dim: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, layers, text_config) -> DecoderCost:
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            [linear_params(layer) for layer in layers],
            heads,
            head_dim,
            text_config.hidden_size,
            text_config.vocab_size,
        )

    def layer(self, l: int, batch: int, n: int, n_kv: int | None = None) -> int:
        n_kv = n if n_kv is None else n_kv
        return 2 * batch * n * self.layer_linear[l] + attention_flops(
            batch, self.heads, n, n_kv, self.head_dim
        )

    def lm_head(self, batch: int, rows: int) -> int:
        return 2 * batch * rows * self.hidden * self.vocab

    def prefill(self, batch: int, tokens_per_layer: list[int], lm_rows: int, attn_override=None) -> int:
        total = 0
        for l, n in enumerate(tokens_per_layer):
            if attn_override and l in attn_override:
                total += 2 * batch * n * self.layer_linear[l] + attn_override[l]
            else:
                total += self.layer(l, batch, n)
        return total + self.lm_head(batch, lm_rows)


def lm_rows(logits_to_keep, length: int) -> int:
    if isinstance(logits_to_keep, int):
        return length if logits_to_keep == 0 else min(logits_to_keep, length)
    if isinstance(logits_to_keep, torch.Tensor):
        return int(logits_to_keep.numel()) if logits_to_keep.dim() else length
    return length
