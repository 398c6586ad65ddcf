"""VisionZip's selection (``VisionZip.zip``'s device work, ``visionzip.zip_rows``) runs through the pruner's
own ``core.graphs.Graphed`` (issue 20: selection overhead). On the CPU with the stand-in capture of
test_graphed.py (``graphs.is_cuda`` patched to True): one capture per input signature, and every call,
replays of new inputs of the captured signature included, gives the eager call's merged features, keep set
and host counts bitwise, for LLaVA-1.5-shaped rows (one row, [CLS]), LLaVA-NeXT-shaped ones (5 tiles of
different sizes: per-row columns as tensors; with an int and a fractional budget; with protected tokens),
[CLS] held in a row, rows without [CLS]; a tiny LLaVA-NeXT prefill keeps the same tokens, logits and FLOPs;
no host read or host-built tensor in ``zip_rows``. tests/test_gpu_graphed_visionzip.py checks a real
capture."""

import types

import pytest
import torch
from test_graphed import StandIn
from test_selection_syncs import SyncOps
from tiny import next_batch, tiny_llava_next

import mmsink
from mmsink.core import graphs
from mmsink.pruners import visionzip
from mmsink.pruners.visionzip import VisionZip
from mmsink.tools.reads import DeviceReads

SEEDS = [0, 1, 2]
P, WIDTH, D = 576, 32, 16
NEXT_SIZES = [576, 500, 452, 576, 390]  # a base tile and unpadded ones: each row its own step

# name: (rows' present tokens (None: every slot), parts, budget, [CLS] given, [CLS] in row, protected)
CASES = {
    "llava15": ([None], None, 64, True, False, False),
    "next": (NEXT_SIZES, [5] * 5, 160, True, False, False),
    "next_fraction": (NEXT_SIZES, [5] * 5, 0.12, True, False, False),  # picks and targets per row too
    "next_protected": (NEXT_SIZES, [5] * 5, 160, True, False, True),
    "cls_in_row": ([575, 575], None, 64, False, True, False),
    "no_cls": ([300, 240, 300], [1, 2, 2], 0.2, False, False, True),
}


def zip_args(case: str, seed: int, device=None) -> tuple:
    """(args, kwargs) of ``VisionZip.zip`` for ``case``: the host values (sizes, parts) fixed, the tensors
    (features, scores, keys, which slots are present, protected, [CLS]) drawn from ``seed``."""
    sizes, parts, _, with_cls, in_row, protect = CASES[case]
    g = torch.Generator().manual_seed(seed)
    rows = len(sizes)
    features = torch.randn(rows, P, WIDTH, generator=g)
    score, metric = torch.rand(rows, P, generator=g), torch.randn(rows, P, D, generator=g)
    present = None
    if sizes[0] is not None:
        first = int(in_row)  # slot 0 holds [CLS]: not a candidate
        order = torch.rand(rows, P - first, generator=g).argsort(1)
        present = torch.zeros(rows, P, dtype=torch.bool)
        present[:, first:] = order < torch.tensor(sizes)[:, None]
    kw = dict(cls_in_row=in_row)
    if with_cls:
        kw["cls"] = torch.randn(rows, WIDTH, generator=g)
    if protect:
        ok = present if present is not None else torch.ones(rows, P, dtype=torch.bool)
        kw["protected"] = (torch.rand(rows, P, generator=g) > 0.97) & ok
    if device is not None:
        features, score, metric = features.to(device), score.to(device), metric.to(device)
        present = present.to(device) if present is not None else None
        kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    given = None if present is None else list(sizes)
    return (features, score, metric, parts, present, given), kw


def zipped(pruner, case: str, seed: int, device=None) -> tuple:
    """(merged features, keep, the host counts ``zip`` left in ``ctx.run``)."""
    ctx = types.SimpleNamespace(run={}, extra_flops=0)
    args, kw = zip_args(case, seed, device)
    out, keep = pruner.zip(ctx, *args, **kw)
    return out, keep, ctx.run


def columns(key) -> list:
    """The per-row columns ([I, 1] tensors) in a graph's key."""
    return [k for k in key if isinstance(k, tuple) and k[0] == "t" and len(k[1]) == 2 and k[1][1] == 1]


@pytest.mark.parametrize("case", list(CASES))
def test_replays_give_the_eager_zip(monkeypatch, case):
    pruner = VisionZip(budget=CASES[case][2])
    eager = [zipped(pruner, case, seed) for seed in SEEDS]
    assert not pruner.rows.graphs  # on the CPU: eager as such
    assert len({tuple(k.flatten().tolist()) for _, k, _ in eager}) == len(SEEDS)  # seeds differ
    for seed, (out, keep, _) in zip(SEEDS, eager):
        features = zip_args(case, seed)[0][0]
        assert not torch.equal(out, features)  # it merged
        assert torch.equal(out[~keep], features[~keep])  # only kept tokens change
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)  # as if the inputs were on a GPU
    cap = StandIn()
    pruner.rows.capture = cap
    for seed, (out, keep, run) in zip(SEEDS, eager):
        got = zipped(pruner, case, seed)
        assert torch.equal(got[0], out) and torch.equal(got[1], keep) and got[2] == run
    assert cap.captures == 1 and cap.replays == len(SEEDS)  # seeds 1, 2: new inputs, the same graph
    (key,) = pruner.rows.graphs
    # rows of different sizes: per-row columns as tensors (the steps; with a fraction, picks and targets
    # too); one row, or protected tokens under an int budget (the step counted inside): plain values
    assert len(columns(key)) == {"next": 1, "next_fraction": 3, "no_cls": 3}.get(case, 0)


def test_no_read_or_host_built_tensor_in_the_device_work(monkeypatch):
    """``zip_rows`` as ``zip`` calls it (per-row columns as tensors, protected tokens, [CLS]) under the
    counters of test_selection_syncs.py; the guard can fail: a column built inside from host data is seen."""
    found = []

    def counted(fn):
        def run(*a):
            with DeviceReads() as r, SyncOps() as ops:
                out = fn(*a)
            found.append((dict(r.sites), dict(ops.seen)))
            return out

        return run

    pruner = VisionZip(budget=0.12)
    pruner.rows.fn = counted(visionzip.zip_rows)
    zipped(pruner, "next_protected", 0)
    assert found == [({}, {})]

    def leaky(*a):
        a = list(a)
        a[10] = torch.tensor([[1]] * a[0].shape[0])  # the step column built inside
        return visionzip.zip_rows(*a)

    pruner.rows.fn, found[:] = counted(leaky), []
    zipped(pruner, "next", 0)
    assert found[0][1] == {"aten.lift_fresh.default": 1}


SPECS = [(3, 5, [(56, 40)]), (2, 4, [(28, 56), (56, 56)])]  # tiles unpadded by rows, by columns, none


def next_prefills(model, runs: list, settings, capture=None) -> tuple:
    """(per run: (the selection's features, keep), logits, stats), the pruner's Graphed: prefills of
    ``model`` wrapped once with VisionZip."""
    mmsink.wrap(model, prune="visionzip", **settings)
    try:
        pruner = mmsink.api.get_handle(model).pruner
        if capture is not None:
            pruner.rows.capture = capture
        seen, real = [], pruner.select

        def select(ctx, tokens):
            out = real(ctx, tokens)
            seen.append((out[0].clone(), out[1].clone()))
            return out

        pruner.select = select
        out = []
        with torch.no_grad():
            for inputs in runs:
                logits = model(**inputs).logits
                out.append((seen[-1], logits, mmsink.stats(model)))
        return out, pruner.rows
    finally:
        mmsink.unwrap(model)


@pytest.mark.parametrize(
    "settings",
    [{"budget": 8}, {"budget": 0.3}, {"budget": 8, "sink_forward": {"factor": 1.05, "max_sinks": 4}}],
    ids=["int", "fraction", "sinks"],
)
def test_next_prefill_graphed_equals_eager(monkeypatch, settings):
    """Tiny LLaVA-NeXT batches (two samples, three images of other aspect ratios; two draws of the same
    shapes: the second a replay): the same logits, kept tokens and FLOPs with the selection graphed
    (stand-in) as eager."""
    model = tiny_llava_next(layers=2).float()
    runs = [next_batch(model, SPECS, seed=seed)[0] for seed in (1, 2)]
    want, rows = next_prefills(model, runs, settings)
    assert not rows.graphs
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)
    cap = StandIn()
    got, rows = next_prefills(model, runs, settings, cap)
    assert cap.captures == 1 and cap.replays == 2 and columns(next(iter(rows.graphs)))
    assert want[0][2].kept_indices != want[1][2].kept_indices  # the draws differ
    for ((feat, keep), logits, a), ((feat_want, keep_want), logits_want, b) in zip(got, want):
        assert torch.equal(feat, feat_want) and torch.equal(keep, keep_want)
        assert torch.equal(logits, logits_want)
        assert a.kept_indices == b.kept_indices and a.kept_tokens == b.kept_tokens
        assert a.prefill_flops == b.prefill_flops and a.baseline_prefill_flops == b.baseline_prefill_flops
        assert a.kept_tokens[0] != a.visual_tokens  # it pruned
        if "sink_forward" in settings:
            assert any(b.extra["vit_sinks"])  # tokens were protected
