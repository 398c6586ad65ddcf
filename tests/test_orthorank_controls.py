"""evals/orthorank_random's controls (issue 18) change which tokens a selection layer updates and nothing
else: the random score keeps OrthoRank's per-layer counts and FLOPs and is reproducible per seed; the
"sink-updated" score puts each sample's first real token into every selection, and at the first selection
layer (same states as plain OrthoRank) swaps it for exactly one of OrthoRank's picks."""

import pytest
import torch
from mmsink.evals import orthorank_random
from test_orthorank import built

import mmsink
from mmsink.pruners import orthorank

SETTINGS = dict(prune="orthorank", form="layers", budget=0.5, layer=1)


def run(model, inputs):
    mmsink.wrap(model, **SETTINGS)
    try:
        with torch.no_grad():
            model(**inputs)
        return mmsink.stats(model)
    finally:
        mmsink.unwrap(model)


@pytest.fixture
def restore(monkeypatch):
    monkeypatch.setattr(orthorank, "orthogonality", orthorank.orthogonality)


def test_random_score_keeps_counts_and_flops(restore):
    model, inputs = built("llava")
    plain = run(model, inputs)
    orthorank_random.patch("random", seed=0)
    a = run(model, inputs)
    orthorank_random.patch("random", seed=0)
    b = run(model, inputs)
    assert a.prefill_flops == plain.prefill_flops
    assert a.extra["orthorank"]["updated"] == plain.extra["orthorank"]["updated"]
    assert a.extra["orthorank"]["updated_indices"] == b.extra["orthorank"]["updated_indices"]
    assert a.extra["orthorank"]["updated_indices"] != plain.extra["orthorank"]["updated_indices"]


def test_sink_updated_score_adds_the_first_real_token(restore):
    model, inputs = built("llava")
    first = inputs["attention_mask"].float().argmax(1).tolist()  # left padding before it
    plain = run(model, inputs).extra["orthorank"]["updated_indices"]
    orthorank_random.patch("sink-updated")
    got = run(model, inputs).extra["orthorank"]["updated_indices"]
    for layer in got:
        for i, f in enumerate(first):
            assert f in got[layer][i] and f not in plain[layer][i], (layer, i)
            assert len(got[layer][i]) == len(plain[layer][i])
    k = SETTINGS["layer"]
    for i, f in enumerate(first):
        assert set(got[k][i]) - set(plain[k][i]) == {f}
