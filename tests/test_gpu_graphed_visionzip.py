"""On a GPU: VisionZip's selection (``visionzip.zip_rows`` through the pruner's own ``core.graphs.Graphed``)
replayed as a real CUDA graph gives the eager merged features and keep set bitwise: LLaVA-1.5- and
LLaVA-NeXT-shaped rows (per-row columns as tensors, protected tokens), 3 seeds of one signature (one graph,
no failed capture), and an fp32 tiny LLaVA-NeXT prefill of two draws of the same shapes. Skipped without
CUDA (tests/test_graphed_visionzip.py checks the routing on the CPU)."""

import pytest
import torch
from test_graphed import capture_failures_raise
from test_graphed_visionzip import CASES, SEEDS, SPECS, columns, next_prefills, zipped
from tiny import next_batch, tiny_llava_next

from mmsink.core import graphs
from mmsink.pruners.visionzip import VisionZip

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_graphed_zip_is_the_eager_one(monkeypatch, case):
    pruner = VisionZip(budget=CASES[case][2])
    with capture_failures_raise():
        got = [zipped(pruner, case, seed, DEV) for seed in SEEDS]
    assert len(pruner.rows.graphs) == 1 and not pruner.rows.failed
    if case in ("next", "next_fraction", "no_cls"):
        assert columns(next(iter(pruner.rows.graphs)))  # per-row columns as tensors
    monkeypatch.setattr(graphs, "on_cuda", lambda x: False)  # the same function, eager
    eager = [zipped(pruner, case, seed, DEV) for seed in SEEDS]
    assert len(pruner.rows.graphs) == 1  # no new capture
    for (out, keep, run), (e_out, e_keep, e_run) in zip(got, eager):
        assert torch.equal(out, e_out) and torch.equal(keep, e_keep) and run == e_run
    assert len({tuple(k.flatten().tolist()) for _, k, _ in eager}) == len(SEEDS)  # seeds differ


@pytest.mark.parametrize(
    "settings",
    [{"budget": 8}, {"budget": 0.3}, {"budget": 8, "sink_forward": {"factor": 1.05, "max_sinks": 4}}],
    ids=["int", "fraction", "sinks"],
)
def test_cuda_next_prefill_graphed_equals_eager(monkeypatch, settings):
    model = tiny_llava_next(layers=2).float()
    runs = [next_batch(model, SPECS, seed=seed)[0] for seed in (1, 2)]
    model.to(DEV)
    runs = [{k: v.to(DEV) for k, v in d.items()} for d in runs]
    with capture_failures_raise():
        got, rows = next_prefills(model, runs, settings)
    assert len(rows.graphs) == 1 and not rows.failed
    monkeypatch.setattr(graphs, "on_cuda", lambda x: False)
    eager, rows = next_prefills(model, runs, settings)
    assert not rows.graphs
    for ((feat, keep), logits, a), ((e_feat, e_keep), e_logits, b) in zip(got, eager):
        assert torch.equal(feat, e_feat) and torch.equal(keep, e_keep)
        assert a.kept_indices == b.kept_indices and a.prefill_flops == b.prefill_flops
        torch.testing.assert_close(logits, e_logits, rtol=0, atol=1e-5)
    assert eager[0][2].kept_indices != eager[1][2].kept_indices  # the draws differ
