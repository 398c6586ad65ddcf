"""replay: apply a recorded token plan with no selection work (the benchmark's ideal row).

``wrap(model, prune="replay", plan=stats.kept_indices)`` keeps, at every layer, exactly the visual tokens
a previous run kept there, for inputs of the same layout. The time it takes is what any pruner with that
plan would cost if choosing were free, so a method's own time minus this is its selection overhead.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.plan import Prefill, gather_rows
from .base import Pruner, register


@register
class ReplayPruner(Pruner):
    name = "replay"
    uses_budget = False
    per_prompt_ok = True

    def final_layer(self, ctx):
        return max(self._layer_masks(ctx), default=0)  # the last layer where the plan changes

    @dataclasses.dataclass
    class Options:
        plan: list | None = None  # [layer][sample] kept visual sequence indices (stats.kept_indices)

    def check_options(self) -> None:
        plan = self.options.plan
        if not plan or not all(isinstance(layer, (list, tuple)) for layer in plan):
            raise ValueError(
                "mmsink: replay needs plan=[layer][sample] kept indices (stats(model).kept_indices)"
            )
        self._masks: dict = {}

    def check_model(self, num_layers: int) -> None:
        if len(self.options.plan) != num_layers:
            raise ValueError(
                f"mmsink: replay plan has {len(self.options.plan)} layers, the model {num_layers}"
            )

    def _layer_masks(self, ctx: Prefill) -> dict[int, tuple]:
        """{layer: ([B, L] bool keep mask over original positions, visual tokens each sample keeps or
        None)} for the layers where the plan changes; built once per input shape and device (the plan is
        fixed). The counts are given when every kept index is an image token of this input and the sets
        only shrink, so that the plan can apply them without reading the device."""
        lay = ctx.layout
        key = (lay.batch, lay.length, str(lay.is_image.device))
        if key not in self._masks:
            plan = self.options.plan
            if any(len(layer) != lay.batch for layer in plan):
                raise ValueError(
                    f"mmsink: replay plan is for {len(plan[0])} samples, the batch has {lay.batch}"
                )
            image = lay.is_image.cpu()  # once per shape
            masks, prev, exact = {}, None, True
            for i, layer in enumerate(plan):
                sets = [sorted(s) for s in layer]
                if sets != prev:
                    m = torch.zeros(lay.batch, lay.length, dtype=torch.bool)
                    for b, s in enumerate(sets):
                        m[b, s] = True
                    exact = exact and not bool((m & ~image).any())
                    if prev is not None:
                        exact = exact and all(set(s) <= set(p) for s, p in zip(sets, prev))
                    counts = [len(s) for s in sets] if exact else None
                    if i > 0 or not torch.equal(m, image):  # layer 0 keeping all: no-op
                        masks[i] = (m.to(lay.is_image.device), counts)
                prev = sets
            self._masks[key] = masks
        return self._masks[key]

    def _apply(self, ctx: Prefill, layer: int) -> None:
        mask, counts = self._layer_masks(ctx).get(layer, (None, None))
        if mask is None:
            return
        known = None
        if counts is not None and ctx.seg.counts is not None:  # every image's tokens as one group
            known = [(t, [n]) for (t, _), n in zip(ctx.seg.counts, counts)]
        ctx.decide(ctx.keep_text(gather_rows(mask, ctx.seg.idx) & ctx.visual()), counts=known)

    def before_llm(self, ctx: Prefill, embeds):
        self._apply(ctx, 0)
        return None

    def after_layer(self, ctx: Prefill, layer: int, hidden, observed) -> None:
        if layer + 1 < ctx.num_layers:
            self._apply(ctx, layer + 1)
