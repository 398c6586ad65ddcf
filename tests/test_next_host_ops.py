"""LLaVA-NeXT's time to first token through ``generate_fast`` (issue 20): outside the CUDA graphs (the
vision tower, the layers after the hand-off) every operator is a kernel launch or host work, and every
read of a device value or tensor built from host data for the device a sync. Counted on the CPU per
stage by ``evals/ttft_breakdown.py --count`` (graphs stood in, so their wrappers' own work counts and
the replays' does not), upper bounds pinned at the measured values: a change that adds operators or
syncs to a stage fails here. Where a pruner's selection runs (VisionZip's projector pre-hook and first
layer, VisiPruner's set-up) only the syncs are pinned, and the layers before a hand-off not at all: the
selection tests pin those. The packing these counts rest on is checked against the model's own; the
tower's launch before the forward by tests/test_tower_first.py."""

import json

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


def test_busy_spans_merge_and_gaps_keep_the_threshold():
    """Kernels of several streams count once (overlapping, nested, touching spans merge); a gap as long as
    the threshold is listed, a shorter one is not; spans reaching outside the window are clipped."""
    spans = tb.union([(20, 30), (0, 10), (5, 8), (8, 12), (12, 15), (25, 26), (40, 45)])
    assert spans == [(0, 15), (20, 30), (40, 45)]
    assert tb.gaps(spans, 0, 50, 5) == [(15, 20), (30, 40), (45, 50)]
    assert tb.gaps(spans, 0, 50, 6) == [(30, 40)]
    assert tb.gaps([(-5, 3), (8, 60)], 0, 50, 1) == [(3, 8)]
    assert tb.gaps([], 2, 9, 7) == [(2, 9)] and tb.gaps([], 2, 9, 8) == []
    assert tb.covered(spans, 5, 22) == 12


def test_a_calls_gaps_carry_their_stage_and_the_hosts_work():
    """``call_summary`` on a hand-made trace (us from an offset, as the profiler's): busy is the union of
    the kernels (two streams overlap), the kernels split by kind, each gap with the stages it spans, the
    outermost record_function label (the script's own left out) else the outermost aten ops on the call's
    thread (another thread's ops left out), else CUDA runtime calls, else Python."""
    t = 1e6
    host = dict(pid=1, tid=1)

    def ev(cat, name, start, end, **where):
        return dict(ph="X", cat=cat, name=name, ts=t + start, dur=end - start, **(where or host))

    gpu = lambda name, start, end, cat="kernel", tid=7: ev(cat, name, start, end, pid=0, tid=tid)  # noqa: E731
    events = [
        ev("user_annotation", tb.CALL, 0, 1000),
        ev("user_annotation", tb.STAGE + "start", 0, 50),
        ev("user_annotation", tb.STAGE + "tower", 50, 300),
        ev("user_annotation", tb.STAGE + "tail", 300, 1000),
        ev("cpu_op", "aten::linear", 10, 90),
        ev("cpu_op", "aten::mm", 20, 80),
        ev("user_annotation", "mmsink select", 440, 605),
        ev("cpu_op", "aten::topk", 450, 460),
        ev("cuda_runtime", "cudaGraphLaunch", 300, 320),
        ev("cuda_runtime", "cudaDeviceSynchronize", 990, 1000),
        ev("cpu_op", "aten::sort", 800, 900, pid=1, tid=2),
        gpu("void cutlass::Kernel2<cutlass_80_tensorop_bf16_gemm>", 100, 400),
        gpu("void pytorch_flash::flash_fwd_kernel<cutlass::bfloat16_t>", 350, 450, tid=8),
        gpu("Memcpy DtoD (Device -> Device)", 600, 610, cat="gpu_memcpy"),
        gpu("triton_per_fused_rms_norm_0", 630, 700),
        gpu("void at::native::vectorized_elementwise_kernel<4>", 705, 710),
        gpu("ampere_gemm_outside", 1200, 1300),  # after the call: not its
    ]
    call = events[0]
    s = tb.call_summary(call, events, gpu=True, least=20)
    assert s["wall_ms"] == 1.0 and s["kernels"] == 5 and s["graph_launches"] == 1
    assert s["kernel_ms"] == 0.485 and s["gpu_busy_ms"] == 0.435 and s["gpu_idle_ms"] == 0.565
    assert s["kinds"] == dict(gemm=0.3, attention=0.1, copies=0.01, other=0.075)
    stages = {r["stage"]: (r["host_ms"], r["gpu_busy_ms"], r["gpu_idle_ms"]) for r in s["stages"]}
    assert stages == {"start": (0.05, 0.0, 0.05), "tower": (0.25, 0.2, 0.05), "tail": (0.7, 0.235, 0.465)}
    got = [(g["start_ms"], g["us"], g["stages"], g["host"], g["host_in_ops_us"]) for g in s["gaps"]]
    assert got == [
        (0.0, 100.0, ["start", "tower"], "aten::linear", 80.0),
        (0.45, 150.0, ["tail"], "mmsink select", 10.0),
        (0.61, 20.0, ["tail"], "Python (no op)", 0.0),  # as long as the threshold; 700-705 is not
        (0.71, 290.0, ["tail"], "cudaDeviceSynchronize", 0.0),
    ]
    assert s["gap_ms"] == 0.56
    cpu = tb.call_summary(call, events, gpu=False, least=20)
    assert cpu["gpu_busy_ms"] is None and cpu["kinds"] is None and cpu["gaps"] == []
    assert [r["host_ms"] for r in cpu["stages"]] == [0.05, 0.25, 0.7]


def test_trace_mode_runs_on_the_cpu(tmp_path, monkeypatch):
    """``--trace --device cpu`` end to end: one entry per config, each with the stages the timed mode reports
    (its ``stamps`` on the same model and inputs), each stage's host time positive and the stages inside
    the call, covering most of it; no GPU columns."""
    made = {}
    for name in ("build", "bench_inputs"):  # the run's model and inputs, for the timed mode's stages
        real = getattr(tb, name)
        monkeypatch.setattr(
            tb, name, lambda *a, real=real, name=name, **k: made.setdefault(name, real(*a, **k))
        )
    methods = "none,visionzip:8"
    argv = ["--trace", "--calls", "2", "--device", "cpu", "--shape", "tiny-next-cpu", "--methods", methods]
    monkeypatch.setattr("sys.argv", ["ttft_breakdown.py", *argv, "--out", str(tmp_path)])
    tb.main()
    with open(tmp_path / "ttft_trace_tiny-next-cpu.json") as f:
        results = json.load(f)["results"]
    assert (tmp_path / "ttft_trace_tiny-next-cpu.md").read_text().count("| call |") == 2
    model, inputs = made["build"], made["bench_inputs"][0]
    assert [r["config"] for r in results] == methods.split(",")
    for r in results:
        m, _, b = r["config"].partition(":")
        mmsink.wrap(model, prune=m, budget=int(b) if b else None)
        try:
            run = lambda: mmsink.generate_fast(model, max_new_tokens=1, graphs=False, **inputs)  # noqa: E731
            timed = [name for name, _ in tb.stamps(model, run, sync=lambda: None)]
        finally:
            mmsink.unwrap(model)
        assert [s["name"] for s in r["stages"]] == list(dict.fromkeys(timed))
        assert len(r["calls"]) == 2 and r["gpu_busy_ms"] is None and r["gaps"] == []
        for c in r["calls"]:
            assert all(s["host_ms"] > 0 for s in c["stages"])
            # the stage ranges lie inside the call's and cover most of it (on a loaded 2-core machine the
            # profiler's own work between the ranges took up to a quarter of a call)
            covered = sum(s["host_ms"] for s in c["stages"])
            assert 0.5 * c["wall_ms"] <= covered <= 1.01 * c["wall_ms"] + 0.5, (covered, c["wall_ms"])
