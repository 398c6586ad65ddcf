"""Layout: where each sample's image tokens are, built once per prefill by the family adapter."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass
class Layout:
    is_image: torch.Tensor  # [B, L] bool
    image_of: torch.Tensor  # [B, L] long: image index inside its sample, -1 for text
    valid: torch.Tensor  # [B, L] bool: not padding
    anchor: torch.Tensor  # [B] long: the query row that selection reads (last prompt token)
    grids: list  # per sample, per image: (rows, cols) of its token grid, or None
    sizes: list  # per sample, per image: its token count (host ints, read once per call)
    counts: torch.Tensor  # [B, M] tokens of image m in sample b (0 where the sample has fewer images)
    # host ints per sample, read with the sizes
    lengths: list  # real tokens
    anchors: list  # the anchor slot
    first_image: list  # the first image slot (the sequence length if none)
    prompt_images: list  # image tokens up to the anchor

    @property
    def dense(self) -> bool:
        """No padding anywhere."""
        return all(n == self.length for n in self.lengths)

    @property
    def batch(self) -> int:
        return self.is_image.shape[0]

    @property
    def length(self) -> int:
        return self.is_image.shape[1]

    @property
    def max_images(self) -> int:
        return max((len(s) for s in self.sizes), default=0)  # host ints: no device sync mid-prefill


def image_runs(is_image: torch.Tensor, tokens_per_image: int | None) -> torch.Tensor:
    """Number the images of each sample: a run of image tokens is one image, split further every
    ``tokens_per_image`` tokens when images sit back to back."""
    b, l = is_image.shape
    prev = torch.zeros_like(is_image)
    prev[:, 1:] = is_image[:, :-1]
    starts = is_image & ~prev
    if tokens_per_image:
        ar = torch.arange(l, device=is_image.device).expand(b, l)
        run_start = torch.cummax(torch.where(starts, ar, torch.full_like(ar, -1)), dim=1).values
        starts = is_image & ((ar - run_start) % tokens_per_image == 0)
    image_of = starts.long().cumsum(1) - 1
    return torch.where(is_image, image_of, torch.full_like(image_of, -1))


FIRST_GUESS = 8  # images per sample the layout's single read covers


@dataclass
class HostCopy:
    """Host copies of a prefill's ids and mask, queued on the device before its vision tower
    (``generate_fast``): the layout reads them instead of the device tensors, so its read waits for
    the copy alone, not for the tower queued after it."""

    ids: torch.Tensor  # the device tensors copied (the layout uses the copies for these objects only)
    mask: torch.Tensor | None
    host_ids: torch.Tensor
    host_mask: torch.Tensor | None
    ready: object = None  # a CUDA event recorded after the copies (None: already there)

    def get(self) -> tuple:
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self.host_ids, self.host_mask


# set by generate_fast around a prefill whose vision tower it launched first
EARLY: ContextVar = ContextVar("mmsink_layout_host_copy", default=None)


def host_copy(ids: torch.Tensor, mask: torch.Tensor | None) -> HostCopy:
    """Start copying ``ids`` and ``mask`` to the host (pinned, asynchronous on a GPU)."""
    if not ids.is_cuda:
        return HostCopy(ids, mask, ids.clone(), None if mask is None else mask.clone())

    def pinned(t):
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)

    host = HostCopy(ids, mask, pinned(ids), None if mask is None else pinned(mask))
    host.ready = torch.cuda.Event()
    host.ready.record()
    return host


def early_copy(input_ids, attention_mask) -> HostCopy | None:
    h = EARLY.get()
    return h if h is not None and h.ids is input_ids and h.mask is attention_mask else None


@dataclass
class Parts:
    """What a layout derives from ids and mask, on their device."""

    is_image: torch.Tensor
    valid: torch.Tensor
    image_of: torch.Tensor
    ar: torch.Tensor
    in_prompt: torch.Tensor
    anchor: torch.Tensor
    counts: torch.Tensor  # [B, m] tokens per image index below m

    @classmethod
    def of(cls, input_ids, attention_mask, image_token_id, tokens_per_image, end: int, m: int) -> Parts:
        is_image = input_ids == image_token_id
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(is_image)
        image_of = image_runs(is_image, tokens_per_image)
        l = input_ids.shape[1]
        ar = torch.arange(l, device=input_ids.device)
        in_prompt = valid & (ar < end)[None]
        anchor = torch.where(in_prompt, ar, torch.full_like(ar, -1)[None]).max(1).values.clamp(min=0)
        return cls(is_image, valid, image_of, ar, in_prompt, anchor, image_counts(image_of, m))

    def facts(self) -> torch.Tensor:
        """[B * m + 4 * B + 1]: the counts, then per sample its real tokens, anchor, first image slot and
        image tokens in its prompt, then the highest image index."""
        l = self.ar.shape[0]
        img = self.is_image & self.valid
        first = torch.where(img, self.ar, torch.full_like(self.ar, l)[None]).min(1).values
        prompt_images = (img & self.in_prompt & (self.ar[None] <= self.anchor[:, None])).sum(1)
        per_sample = torch.stack([self.valid.sum(1), self.anchor, first, prompt_images])  # [4, B]
        return torch.cat([self.counts.flatten(), per_sample.flatten(), self.image_of.max()[None]])


def image_counts(image_of: torch.Tensor, m: int) -> torch.Tensor:
    return (image_of[..., None] == torch.arange(m, device=image_of.device)).sum(1)


def build_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    tokens_per_image: int | None,
    prompt_len: int | None,
    grid_of=None,
) -> Layout:
    b, l = input_ids.shape
    end = min(prompt_len, l) if prompt_len else l
    # the prefill's one early read: image sizes (up to FIRST_GUESS images a sample), the highest image
    # index (more images than that: a second read), each sample's real tokens, anchor, first image slot
    # and image tokens in its prompt; from host copies of ids and mask when generate_fast made them
    m = min(FIRST_GUESS, l)
    args = (image_token_id, tokens_per_image, end, m)
    early = early_copy(input_ids, attention_mask)
    # with host copies the layout is computed on the host and its tensors sent in one copy
    src = Parts.of(input_ids, attention_mask, *args) if early is None else Parts.of(*early.get(), *args)
    read = src.facts().tolist()
    flat, top = read[: b * m], read[-1]
    lengths, anchors, firsts, in_prompt_images = (read[b * m + i * b : b * m + (i + 1) * b] for i in range(4))
    counts = src.counts
    if top >= m:
        counts = image_counts(src.image_of, top + 1)
        flat = counts.flatten().tolist()
    w = counts.shape[1]
    rows = [flat[i * w : (i + 1) * w] for i in range(b)]
    counts = counts[:, : max(top + 1, 1)]  # one column per image index that occurs
    sizes = [[c for c in row if c > 0] for row in rows]
    grids = [[grid_of(c) if grid_of else None for c in row] for row in sizes]
    img, image_of, valid, anchor = src.is_image & src.valid, src.image_of, src.valid, src.anchor
    if early is not None:
        sent = upload([img, image_of, valid, anchor, counts], input_ids.device)
        img, image_of, valid, anchor, counts = sent
    return Layout(
        img, image_of, valid, anchor, grids, sizes, counts, lengths, anchors, firsts, in_prompt_images
    )


def pack(tensors: list, pin: bool) -> torch.Tensor:
    """Integer or bool host tensors as one int64 vector (``pin``: in pinned memory, for a GPU to copy)."""
    flat = torch.cat([t.reshape(-1).long() for t in tensors])
    return flat.pin_memory() if pin else flat


def upload(tensors: list, device) -> list:
    """Host tensors on ``device``, same shapes and dtypes: one asynchronous copy of their ``pack``."""
    gpu = torch.device(device).type != "cpu"
    host = pack(tensors, gpu)
    # (on the CPU a copy stands for the transfer, so that the layout's tensors are their own)
    sent = host.to(device, non_blocking=True) if gpu else host.clone()
    parts = sent.split([t.numel() for t in tensors])
    return [p.view(t.shape).to(t.dtype) for p, t in zip(parts, tensors)]
