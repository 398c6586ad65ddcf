"""Layout: where each sample's image tokens are, built once per prefill by the family adapter."""

from __future__ import annotations

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


def build_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    tokens_per_image: int | None,
    prompt_len: int | None,
    grid_of=None,
) -> Layout:
    is_image = input_ids == image_token_id
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(is_image)
    image_of = image_runs(is_image, tokens_per_image)
    b, l = input_ids.shape
    end = min(prompt_len, l) if prompt_len else l
    ar = torch.arange(l, device=input_ids.device)
    in_prompt = valid & (ar < end)[None]
    anchor = torch.where(in_prompt, ar, torch.full_like(ar, -1)[None]).max(1).values.clamp(min=0)
    # the prefill's one early read: image sizes (up to FIRST_GUESS images a sample), the highest image
    # index (more images than that: a second read), each sample's real tokens, anchor, first image slot
    # and image tokens in its prompt
    m = min(FIRST_GUESS, l)
    counts = (image_of[..., None] == torch.arange(m, device=ar.device)).sum(1)
    img = is_image & valid
    first = torch.where(img, ar, torch.full_like(ar, l)[None]).min(1).values
    prompt_images = (img & in_prompt & (ar[None] <= anchor[:, None])).sum(1)
    per_sample = torch.stack([valid.sum(1), anchor, first, prompt_images])  # [4, B]
    read = torch.cat([counts.flatten(), per_sample.flatten(), image_of.max()[None]]).tolist()
    flat, top = read[: b * m], read[-1]
    lengths, anchors, firsts, in_prompt_images = (read[b * m + i * b : b * m + (i + 1) * b] for i in range(4))
    if top >= m:
        counts = (image_of[..., None] == torch.arange(top + 1, device=ar.device)).sum(1)
        flat = counts.flatten().tolist()
    w = counts.shape[1]
    rows = [flat[i * w : (i + 1) * w] for i in range(b)]
    counts = counts[:, : max(top + 1, 1)]  # one column per image index that occurs
    sizes = [[c for c in row if c > 0] for row in rows]
    grids = [[grid_of(c) if grid_of else None for c in row] for row in sizes]
    return Layout(
        img, image_of, valid, anchor, grids, sizes, counts, lengths, anchors, firsts, in_prompt_images
    )
