"""PlanCache: a DynamicCache whose layers hold only the tokens each layer processed.

It carries, per group of layers that share a key set (a segment), which slots are real tokens, so that
decode steps build the right mask, and it keeps that bookkeeping in step with beam-search reordering.
``get_seq_length`` reports the logical length (tokens of the original sequence seen), which is what
transformers uses for positions and mask sizes.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache


class PlanCache(DynamicCache):
    def __init__(self, config=None):
        super().__init__(config=config)
        self.logical_length = 0
        self.layer_segment: list[int] = []  # layer -> segment id
        self.segment_valid: list[torch.Tensor] = []  # segment -> [B, slots] bool
        self.segment_full: list[bool] = []  # segment holds every token (transformers' own mask applies)
        self.layer_codes: dict[int, torch.Tensor] = {}  # layer -> [B, slots] VAR key groups

    # ---- filled at the end of a prefill
    def set_plan(self, layer_segment, segment_valid, segment_full, logical_length, layer_codes=None):
        self.layer_codes = dict(layer_codes or {})
        self.layer_segment = list(layer_segment)
        self.segment_valid = list(segment_valid)
        self.segment_full = list(segment_full)
        self.logical_length = logical_length

    @property
    def planned(self) -> bool:
        return bool(self.layer_segment)

    def append_tokens(self, new_valid: torch.Tensor) -> None:
        """Record the validity of a decode step's ``q`` new tokens for every segment (before the layers
        run, so masks cover them); the logical length grows once the step is done (``commit``)."""
        self.segment_valid = [torch.cat([v, new_valid.to(v.device)], 1) for v in self.segment_valid]
        for layer, c in self.layer_codes.items():  # generated tokens are never sinks
            self.layer_codes[layer] = torch.cat([c, c.new_zeros(c.shape[0], new_valid.shape[1])], 1)

    def commit(self, n_new: int) -> None:
        self.logical_length += n_new

    # ---- what transformers asks
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.planned:
            return self.logical_length
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        if self.planned:
            return self.logical_length + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.segment_valid = [v.index_select(0, beam_idx.to(v.device)) for v in self.segment_valid]
        self.layer_codes = {k: c.index_select(0, beam_idx.to(c.device)) for k, c in self.layer_codes.items()}

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.segment_valid = [v.repeat_interleave(repeats, 0) for v in self.segment_valid]
        self.layer_codes = {k: c.repeat_interleave(repeats, 0) for k, c in self.layer_codes.items()}

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.segment_valid = [v[indices] for v in self.segment_valid]
        self.layer_codes = {k: c[indices] for k, c in self.layer_codes.items()}

    def crop(self, max_length: int):
        raise NotImplementedError("mmsink: cropping a pruned cache is not supported (assisted decoding)")
