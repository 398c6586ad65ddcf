"""evals/kv_serving_phases.py on the CPU: ``--trace`` profiles the row's own prefill (the model wrapped by the
row's method, keeping its budget), and the phases add up to about the call."""

from __future__ import annotations

import json

from mmsink.evals import kv_serving_phases as ksp

import mmsink


def test_trace_is_the_rows_pruned_prefill(tmp_path, monkeypatch):
    models, seen = [], []
    real_generate, real_traced = mmsink.generate_fast, ksp.traced

    def generate(model, **kw):
        models.append(model)
        return real_generate(model, **kw)

    def traced(fn, device, **kw):
        out = real_traced(fn, device, **kw)
        seen.append(mmsink.stats(models[-1]).mean_kept)  # raises on an unwrapped model
        return out

    monkeypatch.setattr(mmsink, "generate_fast", generate)
    monkeypatch.setattr(ksp, "traced", traced)
    argv = ["--tiny", "--kv", "none", "--method", "visionzip", "--budget", "8", "--batch", "2"]
    ksp.main([*argv, "--prefill-batch", "1", "--trace", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "kv_serving_phases.json").read_text())["rows"]
    # about the budget (NeXT's tiles share it), not the 2,928 image tokens of the prompt
    assert seen == [row["trace"]["mean_kept"]] and 0 < seen[0] <= 16
    parts = row["prefill"] + row["fill"] + row["capture"] + row["decode"]
    assert 0.5 * row["total"] < parts <= row["total"]
    assert "Prefill under the profiler" in (tmp_path / "kv_serving_phases.md").read_text()


def test_per_step_is_the_difference_of_two_calls():
    one = dict(
        wall_ms=10.0, gpu_busy_ms=8.0, kernels=100.0, kinds={"gemm": 5.0}, kernels_ms={"a": 4.0, "b": 1.0}
    )
    many = dict(
        wall_ms=40.0,
        gpu_busy_ms=32.0,
        kernels=400.0,
        kinds={"gemm": 20.0, "copies": 3.0},
        kernels_ms={"a": 10.0, "b": 13.0, "c": 0.3},
    )
    got = ksp.per_step(one, many, 3)
    assert got["wall_ms"] == 10.0 and got["gpu_busy_ms"] == 8.0 and got["kernels"] == 100.0
    assert got["kinds"] == {"gemm": 5.0, "copies": 1.0}
    assert list(got["top_kernels_ms"].items()) == [("b", 4.0), ("a", 2.0), ("c", 0.1)]


def test_trace_decode_row(tmp_path):
    argv = ["--tiny", "--kv", "none", "--method", "visionzip", "--budget", "8", "--batch", "2"]
    ksp.main([*argv, "--trace-decode", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "kv_serving_phases.json").read_text())["rows"]
    assert row["trace_decode"]["steps"] == 3  # --tiny: 4 new tokens
    assert "One decode step under the profiler" in (tmp_path / "kv_serving_phases.md").read_text()
