"""Batches through an lmms-eval adapter that answers one request at a time.

lmms-eval's ``llava_hf`` asserts batch size 1, and its Qwen adapters pad on the right at batch size 1
and have open batch bugs. Each request still goes through the adapter (its prompt, chat template,
processor and decoding), twice: once to record the inputs it gives ``model.generate`` (the
:class:`Capture` stand-in returns no new tokens), once to hand it the tokens the batched ``generate``
produced for that request. The batch is the recorded inputs padded on the left, as the processors pad
for generation.
"""

from __future__ import annotations

import torch

SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


class Capture:
    """The model as the adapter sees it: records ``generate``'s inputs, or replays the batch's answer."""

    def __init__(self, model):
        self.model = model
        self.calls: list[dict] = []
        self.replies: list[torch.Tensor] | None = None

    def __getattr__(self, name):  # dtype, device, config, ... of the real model
        return getattr(self.__dict__["model"], name)

    def generate(self, **kwargs):
        if self.replies is None:
            self.calls.append(kwargs)
            return kwargs["input_ids"]
        return self.replies.pop(0)


def settings_of(call: dict) -> dict:
    """The call's generation settings (everything but tensors); calls batch together when equal."""
    return {k: v for k, v in call.items() if not torch.is_tensor(v)}


def pad_left(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(r.shape[-1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (width - r.shape[-1], 0), value=value) for r in rows])


def pad_stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-request tensors joined on dim 0, trailing dims zero-padded to the largest (LLaVA-NeXT's tiles)."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        pads = []
        for d in reversed(range(1, p.dim())):
            pads += [0, shape[d - 1] - p.shape[d]]
        padded.append(torch.nn.functional.pad(p, pads) if any(pads) else p)
    return torch.cat(padded)


def batch_inputs(calls: list[dict], pad_id: int) -> dict:
    """One ``generate`` input from the requests' own (each a batch of one)."""
    joined = {}
    for key, first in calls[0].items():
        if not torch.is_tensor(first):
            continue
        parts = [c[key] for c in calls]
        if key in SEQUENCE_KEYS:
            joined[key] = pad_left(parts, pad_id if key == "input_ids" else 0)
        else:
            joined[key] = pad_stack(parts)
    return joined


def eos_ids(settings: dict, model) -> set[int]:
    eos = settings.get("eos_token_id", model.generation_config.eos_token_id)
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def replies(calls: list[dict], sequences: torch.Tensor, width: int, eos: set[int]) -> list[torch.Tensor]:
    """Each request's own prompt and its new tokens up to and with the first end token, as ``generate``
    returns them for a batch of one (the batch pads finished rows)."""
    out = []
    for call, row in zip(calls, sequences):
        new = row[width:].tolist()
        end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        tail = torch.tensor(new[:end], dtype=row.dtype, device=row.device)
        out.append(torch.cat([call["input_ids"][0], tail])[None])
    return out


def generate_batch(model, calls: list[dict], pad_id: int) -> list[torch.Tensor]:
    """The calls (equal settings) as one ``generate``; each call's reply."""
    settings = settings_of(calls[0])
    inputs = batch_inputs(calls, pad_id)
    sequences = model.generate(**inputs, **settings)
    return replies(calls, sequences, inputs["input_ids"].shape[-1], eos_ids(settings, model))
