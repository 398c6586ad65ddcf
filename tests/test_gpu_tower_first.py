"""On a GPU: ``generate_fast`` launches LLaVA-NeXT's graphed tower before the forward and reads the layout
from pinned host copies of ids and mask queued before it (tests/test_tower_first.py checks the same on
the CPU with stand-ins). Skipped without CUDA."""

import pytest
import torch
from tiny import next_batch, tiny_llava_next

import mmsink
from mmsink.core import layout as layout_mod
from mmsink.fast import vision_graph

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "method,opts",
    [
        (None, {}),
        ("visionzip", {"budget": 8}),
        ("fastv", {"budget": 8}),
        ("dart", {"budget": 8}),
        ("visipruner", {"budget": 8}),
    ],
)
def test_cuda_tower_first_gives_generates_tokens(monkeypatch, method, opts):
    """Images A, B, A: from the second prefill of the shape on, the tower is launched before the forward
    (counted); every answer is greedy generate's for its own image, and the same with the launch off."""
    model = tiny_llava_next()
    model.generation_config.eos_token_id = None
    data = [next_batch(model, [(3, 5, [(56, 56)])], seed=s)[0] for s in (0, 1)]
    model.cuda()
    mmsink.wrap(model, prune=method, **opts)
    launches = []
    real = vision_graph.GraphedTower.launch
    monkeypatch.setattr(
        vision_graph.GraphedTower, "launch", lambda self, x, key: (launches.append(1), real(self, x, key))
    )
    for d in data + data[:1]:
        inputs = {k: v.cuda() for k, v in d.items()}
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(mmsink.generate_fast(model, max_new_tokens=6, **inputs), ref)
        assert torch.equal(mmsink.generate_fast(model, max_new_tokens=6, tower_first=False, **inputs), ref)
    assert len(launches) == 2  # the first prefill captured the tower's graph in the forward


def test_cuda_layout_from_pinned_copies_equals_the_device_one():
    ids = torch.tensor([[0, 0, 1, 99, 99, 5, 99, 99, 99, 7], [1, 2, 99, 99, 99, 99, 5, 6, 99, 7]]).cuda()
    mask = (ids != 0).long()
    want = layout_mod.build_layout(ids, mask, 99, None, 9)
    token = layout_mod.EARLY.set(layout_mod.host_copy(ids, mask))
    try:
        got = layout_mod.build_layout(ids, mask, 99, None, 9)
    finally:
        layout_mod.EARLY.reset(token)
    for f in ("is_image", "image_of", "valid", "anchor", "counts"):
        x, y = getattr(got, f), getattr(want, f)
        assert x.is_cuda and x.dtype == y.dtype and torch.equal(x, y), f
    for f in ("sizes", "lengths", "anchors", "first_image", "prompt_images"):
        assert getattr(got, f) == getattr(want, f), f
