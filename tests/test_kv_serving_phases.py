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
