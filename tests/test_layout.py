"""The layout's host facts (one device read) against a plain Python walk over the token ids."""

import pytest
import torch

from mmsink.core.layout import FIRST_GUESS, build_layout

IMG = 7


def walk(ids, mask, prompt_len):
    """Per sample: image runs, length, anchor, first image slot, image tokens up to the anchor, computed
    token by token."""
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        sizes, prev = [], False
        for t, v in zip(row, m):
            img = t == IMG and v
            if img and not prev:
                sizes.append(0)
            if img:
                sizes[-1] += 1
            prev = img
        end = min(prompt_len or len(row), len(row))
        anchor = max([i for i in range(end) if m[i]], default=0)
        first = next((i for i, (t, v) in enumerate(zip(row, m)) if t == IMG and v), len(row))
        in_prompt = sum(1 for i in range(anchor + 1) if row[i] == IMG and m[i])
        out.append((sizes, sum(m), anchor, first, in_prompt))
    return out


@pytest.mark.parametrize("images", [1, 3, FIRST_GUESS + 3])  # past the first read's guess: a second read
@pytest.mark.parametrize("prompt_len", [None, 30])
def test_layout_host_facts(images, prompt_len):
    g = torch.Generator().manual_seed(images)
    rows = []
    for b in range(3):
        row = [1] + torch.randint(10, 50, (3 + b,), generator=g).tolist()
        for i in range(images - b if images > b else 1):
            row += [IMG] * (4 + (i + b) % 3) + torch.randint(10, 50, (1 + i % 2,), generator=g).tolist()
        rows.append(row)
    n = max(map(len, rows))
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    lay = build_layout(ids, mask, IMG, None, prompt_len)
    ref = walk(ids, mask, prompt_len)
    assert lay.sizes == [r[0] for r in ref]
    assert lay.lengths == [r[1] for r in ref] and lay.dense == all(r[1] == n for r in ref)
    assert lay.anchors == [r[2] for r in ref] == lay.anchor.tolist()
    assert lay.first_image == [r[3] for r in ref] and lay.prompt_images == [r[4] for r in ref]
    assert lay.counts.shape[1] == max(len(r[0]) for r in ref)
    assert lay.counts.tolist() == [r[0] + [0] * (lay.counts.shape[1] - len(r[0])) for r in ref]
