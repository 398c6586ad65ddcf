"""LLaVA-NeXT's time to first token through ``generate_fast`` (issue 20): outside the CUDA graphs (the
vision tower, the layers after the hand-off) every operator is a kernel launch or host work, and every
read of a device value or tensor built from host data for the device a sync. Counted on the CPU per
stage by ``evals/ttft_breakdown.py --count`` (graphs stood in, so their wrappers' own work counts and
the replays' does not), upper bounds pinned at the measured values: a change that adds operators or
syncs to a stage fails here. Where a pruner's selection runs (VisionZip's projector pre-hook and first
layer, VisiPruner's set-up) only the syncs are pinned, and the layers before a hand-off not at all: the
selection tests pin those. The packing these counts rest on is checked against the model's own; the
tower's launch before the forward by tests/test_tower_first.py."""

import pytest
import torch
from mmsink.evals import ttft_breakdown as tb
from mmsink.patches import llava_next
from tiny import next_batch, tiny_llava_next

import mmsink

# per stage: (most aten operators, most device reads) outside the graphs, batch 1, one 5-tile image
BOUNDS = {
    # the tower's input (a view of the image's tiles), the host copies of ids and mask (a GPU: an empty
    # pinned tensor and a copy each), the graph's input: the GPU idles until the launch
    "start": (4, 0),
    # the layout's tensors in one copy from the host (computed there from the copies, read there: counted
    # as host ops) and unpacked; positions; embeddings; transformers' tile concatenation
    "before_tower": (23, 0),
    "tower": (1, 0),  # the picked hidden state out of the graph (launched before: no input copy here)
    "projector": (12, 0),  # the feature layer's patches (a copy: [CLS] sliced off), two linears
    "merge": (5, 0),  # one gather of the projected rows, one write of the newline rows
    "placement": (4, 0),  # concatenation, placeholder mask, masked_scatter (transformers' forward)
    "plan": (17, 0),  # the rotary tables of the prompt (transformers' text model)
    "tail": (5, 0),  # hidden states and rotary rows into the graph's inputs, the token out of it
    "after": (2, 0),  # the token into the output (no stop-id tensor for one new token)
}
METHODS = [
    ("none", {}, []),
    ("visionzip", {"budget": 8}, ["projector", "plan"]),  # its selection: projector pre-hook, first layer
    ("fastv", {"budget": 8}, []),
    ("dart", {"budget": 8}, []),
    ("visipruner", {"budget": 8}, ["before_tower"]),  # its per-prefill set-up
]
VISIONZIP_TOWER = 3  # + the query and key taps' outputs (the feature layer's output is the picked state)


@pytest.fixture(scope="module")
def model():
    m = tiny_llava_next(layers=6)
    m.generation_config.eos_token_id = None
    return m


@pytest.fixture(scope="module")
def inputs(model):
    return next_batch(model, [(3, 5, [(56, 56)])], seed=1)[0]


def counted(model, inputs, method, opts) -> dict:
    mmsink.wrap(model, prune=method, **opts)
    try:
        return tb.count_prefill(model, inputs)["stages"]
    finally:
        mmsink.unwrap(model)


@pytest.mark.parametrize("method,opts,selection", METHODS)
def test_host_ops_and_syncs_per_stage(model, inputs, method, opts, selection):
    stages = counted(model, inputs, method, opts)
    # the graphs ran: the tower's launched before the forward (its replay counts in "start")
    assert stages["start replay"]["ops"] > 50 and stages["tail replay"]["ops"] > 100
    assert "tower replay" not in stages
    assert stages["start"]["early"] == 1  # one wait, for the host copies of ids and mask
    assert stages["before_tower"]["host_ops"] > 20  # the layout's work on them
    for stage, (ops, syncs) in BOUNDS.items():
        if method == "visionzip" and stage == "tower":
            ops = VISIONZIP_TOWER
        got = stages[stage]
        assert got["syncs"] <= syncs, (stage, got["sync_sites"])
        if stage not in selection:
            assert got["ops"] <= ops, (stage, got["top_ops"])


def test_the_count_sees_the_models_own_packing(model, inputs, monkeypatch):
    """The guard can fail: transformers' per-image packing (reshapes, unpadding, newline and base-tile
    concatenations) in place of the gather exceeds the merge's bounds, its lengths tensor built from host
    data for the device (a blocking copy on a GPU: the host waits for the tower and the projector)."""
    monkeypatch.setattr(
        llava_next,
        "bind_packing",
        lambda family, seam: mmsink.core.bind.Bound(
            family.model.model, "pack_image_features", lambda previous: previous.__func__
        ),
    )
    merge = counted(model, inputs, "none", {})["merge"]
    assert merge["ops"] > BOUNDS["merge"][0] + 5
    assert merge["syncs"] == 1 and "modeling_llava_next.py" in list(merge["copy_sites"])[0]


@pytest.mark.parametrize(
    "sizes",
    [[(28, 56)], [(56, 56), (40, 56)], [(20, 56), (56, 13), (56, 56)], [(100, 30)]],
)
def test_packing_equals_the_models_own(model, sizes):
    """The bound packing gives transformers' features, bitwise: images of several aspect ratios (rows or
    columns unpadded), several images at once."""
    family = mmsink.patches.family_for(model)
    seam = type("Seam", (), {"measuring": True})()
    bound = llava_next.bind_packing(family, seam)
    inner = model.model
    try:
        counts = family.tiles(torch.zeros(len(sizes), 5, 3, 28, 28), {"image_sizes": sizes})
        g = torch.Generator().manual_seed(len(sizes))
        feats = torch.randn(sum(counts), 4, inner.image_newline.shape[0], generator=g)
        chunks = list(feats.split(counts))
        args = (chunks, torch.tensor(sizes), "default")
        want, want_lens = type(inner).pack_image_features(inner, *args, image_newline=inner.image_newline)
        got, got_lens = inner.pack_image_features(*args, image_newline=inner.image_newline)
    finally:
        bound.remove()
    assert [t.shape for t in got] == [t.shape for t in want]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(got_lens, want_lens)
    assert "pack_image_features" not in inner.__dict__


def test_the_towers_launch_is_stamped_without_a_sync(model, monkeypatch):
    """Timed mode: the stage before the tower's launch is the host's work alone; a sync at the launch's
    mark would wait for the tower and put its kernels in that stage (a 6 ms "GPU idle" stage on the H200
    that was mostly the tower)."""
    monkeypatch.setattr(tb.vision_graph.GraphedTower, "launch", lambda self, *a: None, raising=False)
    syncs = []
    rows = tb.stamps(model, lambda: tb.vision_graph.GraphedTower.launch(None), sync=lambda: syncs.append(1))
    assert len(syncs) == 2  # before and after the call only
    assert [name for name, _ in rows] == [tb.NAMES["start"], tb.NAMES["before_tower"]]
