"""What the last prefill did."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    method: str | None
    budget: int | float | None
    kept_tokens: list[list[int]]  # [layer][sample] visual tokens the layer processed
    kept_indices: list[list[list[int]]]  # [layer][sample] sequence indices of those visual tokens
    visual_tokens: list[int]  # [sample] visual tokens in the input
    prefill_flops: int  # FLOPs the last prefill executed (vision tower, projector, LM, lm_head, selection)
    baseline_prefill_flops: int  # the same inputs without mmsink
    tokens_per_layer: list[int] = field(default_factory=list)  # padded slots each layer ran on
    extra: dict = field(default_factory=dict)  # method-specific facts (e.g. fusion layers)

    @property
    def flops_ratio(self) -> float:
        return self.prefill_flops / max(self.baseline_prefill_flops, 1)

    @property
    def mean_kept(self) -> float:
        """Average visual tokens per layer per sample (the usual 'budget' convention)."""
        rows = [sum(layer) / max(len(layer), 1) for layer in self.kept_tokens]
        return sum(rows) / max(len(rows), 1)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "kept_tokens": self.kept_tokens,
            "visual_tokens": self.visual_tokens,
            "prefill_flops": self.prefill_flops,
            "baseline_prefill_flops": self.baseline_prefill_flops,
            "flops_ratio": self.flops_ratio,
            "mean_kept": self.mean_kept,
            "extra": self.extra,
        }
