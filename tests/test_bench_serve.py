"""``mmsink serve-bench``: the batch search finds the largest batch under an injected memory limit, and
tokens/s is batch x new tokens over the median of the recorded call times. ``--kv``: each row's tokens are
``generate_fast``'s for the same wrap, its KV bytes those of the buffers the decoder's layout implies
(computed here from the config), refusals are rows, bad names one-line errors."""

import statistics

import pytest
import torch

import mmsink
from mmsink.tools import bench, serve_bench


@pytest.mark.parametrize("limit", [1, 3, 5, 8, 37, 200])
def test_search_finds_the_largest_batch(limit):
    tried = []

    def attempt(b):
        tried.append(b)
        return b <= limit

    best, log, cut = serve_bench.largest_batch(attempt, max_batch=64, resolution=1000)
    assert best == min(limit, 64) and not cut
    assert list(log) == tried and all(log[b] == (b <= limit) for b in tried)
    doubling = [b for b in tried if b & (b - 1) == 0]
    assert doubling[: len(doubling)] == tried[: len(doubling)]  # powers of two first, then bisection
    assert len(tried) == len(set(tried))  # no batch tried twice


def test_search_resolution_and_deadline():
    best, log, _ = serve_bench.largest_batch(lambda b: b <= 100, max_batch=256, resolution=8)
    assert 100 - 100 // 8 <= best <= 100 and len(log) < 12
    best, log, cut = serve_bench.largest_batch(lambda b: True, max_batch=256, deadline=0.0)
    assert (best, list(log), cut) == (1, [1], True)  # past the deadline: stop after the first fit
    best, log, _ = serve_bench.largest_batch(lambda b: b <= 100, max_batch=256, resolution=1000, first=16)
    assert best == 100 and list(log)[:4] == [16, 32, 64, 128]  # doubling from 16
    best, log, _ = serve_bench.largest_batch(lambda b: b <= 5, max_batch=256, resolution=1000, first=16)
    assert best == 5 and list(log)[:2] == [16, 8]  # 16 does not fit: bisection below it


def memory_model(fixed, per_seq, capacity, step_at=None, step=0):
    """A fake device: peak(b) = fixed + per_seq * b (+ ``step`` above batch ``step_at``: a workspace the
    line through small batches cannot see); a batch fits when its peak is within ``capacity``. Returns
    (probe, the true largest batch by brute force, the batches probed)."""

    def peak(b):
        return fixed + per_seq * b + (step if step_at is not None and b > step_at else 0)

    probed = []

    def probe(b):
        probed.append(b)
        return peak(b) <= capacity, peak(b)

    true = max([b for b in range(1, 4097) if peak(b) <= capacity], default=0)
    return probe, true, probed


def within(best, true, resolution, max_batch):
    """best fits and the true largest (capped) is at most one tolerance step above it."""
    top = min(true, max_batch)
    return best <= top and top - best <= max(1, best // resolution)


GIB = 2**30
# (fixed, per sequence, capacity): H200-like lines (13 GiB of weights, 0.1 .. 3.3 GiB a sequence) and
# small ones; a few whose limit is below the second fitted batch or above the cap
LINES = [
    (13 * GIB, int(0.46 * GIB), int(139.8 * GIB)),
    (13 * GIB, int(3.3 * GIB), int(139.8 * GIB)),
    (20 * GIB, int(1.0 * GIB), int(139.8 * GIB)),
    (13 * GIB, int(0.1 * GIB), int(139.8 * GIB)),  # limit above the cap of 256
    (1000, 100, 2650),  # limit 16
    (1000, 100, 1650),  # limit 6: below the second fitted batch (8)
    (1000, 100, 1050),  # limit 0: nothing fits
]


@pytest.mark.parametrize("resolution", [4, 8])
@pytest.mark.parametrize("first", [1, 8])
@pytest.mark.parametrize("line", LINES)
def test_predicted_search_on_a_linear_memory_model(line, first, resolution):
    """A line the two small batches see exactly: the true largest batch (brute force) within the
    tolerance, in at most 4 probes at resolution 4 (two fits, the prediction, one step) and 5 at 8 (the
    margin's 10 % of the room and the floors can take two steps of 1/8), none tried twice; the fit
    reproduces the line. A limit below 4 x resolution: steps of one batch, one probe more; below the
    second small batch: bisection, at most 5 probes."""
    probe, true, probed = memory_model(*line)
    out = serve_bench.predicted_batch(probe, line[2], max_batch=256, resolution=resolution, first=first)
    assert within(out["best"], true, resolution, 256), (out, true)
    assert list(out["tried"]) == probed and len(set(probed)) == len(probed)
    assert all(out["tried"][b] == (b <= true) for b in probed)
    assert out["first_oom"] == min([b for b in probed if b > true], default=None)
    fitted = true >= max(2 * first, 8)  # both small batches fit: a prediction, then steps
    small = true < 4 * resolution  # steps of one batch: one more
    assert len(probed) <= ({4: 4, 8: 5}[resolution] + small if fitted else 5), probed
    if out["predicted"] is not None:  # both fitted batches fit
        assert out["per_seq_bytes"] == pytest.approx(line[1]) and out["fixed_bytes"] == pytest.approx(line[0])
        assert out["found"] in ("predicted", "stepped up") and not out["cut"]
        expect = min(256, int(0.9 * (line[2] - line[0]) // line[1]))
        assert out["predicted"] == max(1, expect)
        if max(2 * first, 8) < expect < 256:
            assert expect in probed  # the jump: the third probe
            assert probed.index(expect) == 2


@pytest.mark.parametrize("resolution", [4, 8])
@pytest.mark.parametrize("at", [0.2, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("step_gib", [5, 20, 60])
@pytest.mark.parametrize("per_seq", [0.46, 1.0, 3.3])
def test_predicted_search_with_a_workspace_step(per_seq, step_gib, at, resolution):
    """A workspace of ``step_gib`` that appears above a batch at ``at`` of the linear limit: the line
    overshoots, the search still ends within the tolerance of the true largest, in at most 8 probes."""
    fixed, cap = 13 * GIB, int(139.8 * GIB)
    linear = int((cap - fixed) / (per_seq * GIB))
    probe, true, probed = memory_model(
        fixed, int(per_seq * GIB), cap, step_at=max(16, int(at * linear)), step=step_gib * GIB
    )
    out = serve_bench.predicted_batch(probe, cap, max_batch=1024, resolution=resolution, first=8)
    assert within(out["best"], true, resolution, 1024), (out, true)
    assert len(probed) <= 8 and len(set(probed)) == len(probed), probed
    if out["predicted"] > true:  # the jump failed: found below the prediction
        assert out["found"] == "bisected" and out["tried"][out["predicted"]] is False


@pytest.mark.parametrize("share", [0.84, 0.86, 0.88])
@pytest.mark.parametrize("resolution", [4, 8])
def test_predicted_search_steps_down_once(share, resolution):
    """The device holds less than the capacity read (``share`` of it): the predicted batch fails, the
    true largest is within 1/(resolution + 1) below it, and one batch stepped down closes the gap: 4
    probes (two small batches, the prediction, the step)."""
    fixed, per_seq, cap = 13 * GIB, GIB, int(139.8 * GIB)
    probe, true, probed = memory_model(fixed, per_seq, int(share * cap))
    out = serve_bench.predicted_batch(probe, cap, max_batch=1024, resolution=resolution, first=8)
    pred = int(0.9 * (cap - fixed) // per_seq)
    assert out["predicted"] == pred and true < pred and pred - true <= pred // (resolution + 1)
    assert within(out["best"], true, resolution, 1024) and out["found"] == "bisected"
    assert probed[:3] == [8, 16, pred] and len(probed) == 4 and out["tried"][probed[3]]


def test_predicted_search_does_not_start_a_batch_past_the_deadline():
    """Each probe takes 1 + 0.5 b s of a fake clock. With 40 s, batches 8 and 16 (5 + 9 s) run, the
    predicted batch would take 9 + 0.5 (pred - 16) s on their line and is not started: cut, the largest
    fit 16 a lower bound, the batch and its expected seconds reported. With 200 s the prediction runs, not
    the step above it; with 10^4 s the search ends."""
    clock = [0.0]
    probe, true, probed = memory_model(13 * GIB, int(0.46 * GIB), int(139.8 * GIB))

    def timed(b):
        clock[0] += 1 + 0.5 * b
        return probe(b)

    now = lambda: clock[0]  # noqa: E731
    out = serve_bench.predicted_batch(timed, int(139.8 * GIB), 1024, 4, deadline=40.0, first=8, now=now)
    pred = out["predicted"]
    assert probed == [8, 16] and out["cut"] and out["best"] == 16 and out["found"] == "not verified"
    assert out["not_run"] == [pred, 9 + 0.5 * (pred - 16)] and out["seconds"] == {8: 5.0, 16: 9.0}
    clock[0], probed[:] = 0.0, []
    out = serve_bench.predicted_batch(timed, int(139.8 * GIB), 1024, 4, deadline=200.0, first=8, now=now)
    step = pred + pred // 4  # 5 + 9 + (1 + pred / 2) s spent: the step above would end past 200 s
    assert probed == [8, 16, pred] and out["best"] == pred and out["not_run"] == [step, 1 + 0.5 * step]
    clock[0], probed[:] = 0.0, []
    out = serve_bench.predicted_batch(timed, int(139.8 * GIB), 1024, 4, deadline=1e4, first=8, now=now)
    assert probed[:3] == [8, 16, pred] and not out["cut"] and within(out["best"], true, 4, 1024)


def test_predicted_search_fallbacks_and_deadline():
    # the first batch does not fit: bisection below it (as largest_batch)
    probe, true, probed = memory_model(1000, 100, 1650)  # limit 6
    out = serve_bench.predicted_batch(probe, 1650, max_batch=256, resolution=1000, first=16)
    assert (out["best"], out["found"], probed[0]) == (6, "bisected", 16) and out["predicted"] is None
    # no peak read (None): doubling from the second batch, then bisection
    seen = []

    def unread(b):
        seen.append(b)
        return b <= 100, None

    out = serve_bench.predicted_batch(unread, 10**9, max_batch=256, resolution=1000, first=8)
    assert out["best"] == 100 and out["found"] == "doubled" and seen[:5] == [8, 16, 32, 64, 128]
    # past the deadline: the first batch only, reported as cut
    probe, true, probed = memory_model(1000, 100, 10**6)
    out = serve_bench.predicted_batch(probe, 10**6, deadline=0.0, first=8)
    assert probed == [8] and out["best"] == 8 and out["cut"]
    # a line that does not grow (a flat peak): the cap is predicted
    probe = lambda b: (b <= 300, 5000)  # noqa: E731
    out = serve_bench.predicted_batch(probe, 10**4, max_batch=256, resolution=4, first=8)
    assert (out["predicted"], out["best"], list(out["tried"])) == (256, 256, [8, 16, 256])


def test_serve_on_tiny_model_under_a_fake_memory_limit():
    """The real path (tiny-cpu model through generate_fast) with a limit that raises the allocator's
    out-of-memory error above batch 2 and a clock returning recorded times."""
    seen, recorded = [], iter([0.5, 0.7])

    def check(b):
        seen.append(b)
        if b > 2:
            raise torch.OutOfMemoryError("fake limit")

    def clock(fn):
        fn()
        return next(recorded)

    opts = dict(new_tokens=3, max_batch=8, resolution=8, reps=2, seconds=600, compile=False)
    res = serve_bench.serve(
        ["tiny-cpu"], [64], ["fastv"], "cpu", torch.float32, dict(opts, clock=clock, check=check)
    )
    (row,) = res["rows"]
    assert row["max_batch"] == 2 and row["tried"] == {"1": True, "2": True, "4": False, "3": False}
    assert row["times_s"] == [0.5, 0.7]
    assert row["tokens_per_s"] == pytest.approx(2 * 3 / statistics.median([0.5, 0.7]))
    assert seen.count(2) == 2 + 2 + 2  # search (two calls), then at the largest batch two untimed + two timed
    assert "| tiny-cpu | fastv | 64 | none | 2 |" in serve_bench.markdown(res) and "clock" not in res


def test_serve_predicted_on_tiny_model():
    """The real path (tiny-decode-cpu, fastv, through generate_fast) with a fake device: peak(b) = 1000 +
    100 b bytes, capacity 2100 (margin 0: batch 11 predicted), the allocator's out-of-memory error above
    batch 11. Batches 1, 8 and 11 (two calls + one timed each: the largest needs no further calls), then
    13 (fails at its first call); the row's tokens are generate_fast's at batch 11."""
    seen = []

    def check(b):
        seen.append(b)
        if b > 11:
            raise torch.OutOfMemoryError("fake limit")

    memory = lambda b: 1000 + 100 * b  # noqa: E731
    opts = dict(OPTS, max_batch=64, resolution=4, margin=0.0, check=check, memory=memory, capacity=2100)
    torch.manual_seed(0)
    res = serve_bench.serve([SHAPE], [64], ["fastv"], "cpu", torch.float32, opts)
    (row,) = res["rows"]
    assert row["tried"] == {"1": True, "8": True, "11": True, "13": False} and row["max_batch"] == 11
    s = row["search"]
    assert (s["found"], s["predicted"], s["first_oom"], s["probes"]) == ("predicted", 11, 13, 4)
    assert s["per_seq_bytes"] == 100 and s["fixed_bytes"] == 1000 and s["peaks"]["11"] == 2100
    assert seen == [1, 1, 1, 8, 8, 8, 11, 11, 11, 13]  # every batch: 2 untimed calls + 1 timed
    assert row["times_s"] == [1.0] and row["tokens_per_s"] == 11 * NEW / 1.0
    assert row["tokens"] == reference("fastv", None, 11)
    md = serve_bench.markdown(res)
    assert f"| {SHAPE} | fastv | 64 | none | 11 | predicted (11) | 4 | 13 | 0 |" in md
    assert "memory" not in res and "Largest batch predicted" in md
    assert row["alloc_retries"] is None and "retries)" not in md  # (a CPU run has no allocator's count)
    row["alloc_retries"] = 3  # as a CUDA run at the memory's end reads it
    assert "(3 retries) |" in serve_bench.markdown(res).splitlines()[-1]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--shapes", "tiny-cpu,tiny-next-cpu", "--budgets", "64"], "one budget per shape"),
        (["--shapes", "tiny-qwen-cpu"], "LLaVA families"),
        (["--prefill-batch", "0"], "--prefill-batch must be >= 1"),
    ],
)
def test_bad_settings_are_one_line_errors(argv, msg, capsys):
    with pytest.raises(SystemExit):
        serve_bench.main(argv + ["--device", "cpu"])
    assert msg in capsys.readouterr().err


# tiny-decode-cpu: LLaVA-1.5's prompt (1 + 35 + 576 + 29 tokens), 4 layers, 2 KV heads of 32, fp32
SHAPE, PROMPT, LAYERS, KV_HEADS, HEAD, F32 = "tiny-decode-cpu", 641, 4, 2, 32, 4
NEW = 4  # new tokens: the decoder holds NEW - 1 steps


def slots(n: int) -> int:
    return -(-n // 128) * 128  # the decoders round their slot counts up to 128


def dense_bytes(length: int = PROMPT, steps: int = NEW - 1) -> int:
    """Per sequence: keys and values of every prompt token and new token, per layer."""
    return LAYERS * 2 * KV_HEADS * slots(length + steps) * HEAD * F32


def window_bytes(window: int, first: int = 4, steps: int = NEW - 1) -> int:
    """Per sequence: keys, values and raw (unrotated-at-write) keys of the kept slots (sinks + window:
    the prompt is longer, so the prefill already evicted) plus the write slot, per layer."""
    kept = min(PROMPT, first + window)
    return LAYERS * 3 * KV_HEADS * slots(min(kept + steps, first + window) + 1) * HEAD * F32


def quant_bytes(bits: int, group: int = 32, first: int = 4, steps: int = NEW - 1) -> int:
    """Per sequence, KVSink's store as fast_quant lays it out: key codes per (group of tokens, channel),
    value codes per (token, channel group), ``bits`` each packed into bytes; an fp32 scale and offset per
    key (group, channel) and value (token, channel group); an exact ring of ``group`` keys / values; the
    exact copies of the ``first`` sinks; one spare group / slot / entry each."""
    cap = slots(PROMPT + steps)
    groups, cgroups = -(-cap // group) + 1, HEAD // min(group, HEAD)
    codes = groups * HEAD * group * bits // 8 + (cap + 1) * HEAD * bits // 8
    scales = 2 * F32 * (groups * HEAD + (cap + 1) * cgroups)
    exact = 2 * F32 * HEAD * (group + first + 1)
    return LAYERS * KV_HEADS * (codes + scales + exact)


def reference(method, kv, batch: int):
    """Sample 0's new tokens of ``generate_fast`` on the seed-0 model, wrapped directly."""
    torch.manual_seed(0)
    model = bench.build(SHAPE)
    model.generation_config.eos_token_id = None
    one, _ = bench.bench_inputs(model, 1, 35, 29)
    prune = None if method == "none" else method
    if prune is not None or kv is not None:
        mmsink.wrap(model, prune=prune, budget=64 if prune else None, kv=kv)
    out = mmsink.generate_fast(
        model, max_new_tokens=NEW, compile=False, **serve_bench.repeat_batch(one, batch)
    )
    return out[0, PROMPT:].tolist()


OPTS = dict(new_tokens=NEW, resolution=8, reps=1, seconds=600, compile=False, clock=lambda fn: fn() or 1.0)


def test_kv_rows_tokens_and_kv_bytes():
    """Dense at batch 2; window 200 (the 641-token prompt is evicted to 204), int4 and LFPS top-8 at batch
    1 (fewer calls: the search tries each batch from 1): tokens as generate_fast's for the same wrap, KV
    bytes per sequence as the layouts give, int4 < window < dense."""
    rows, md = {}, ""
    for names, top in (("none", 2), ("window200,int4,lfps8", 1)):
        torch.manual_seed(0)
        kvs = serve_bench.kv_modes(names)
        res = serve_bench.serve(
            [SHAPE], [64], ["none"], "cpu", torch.float32, dict(OPTS, max_batch=top), kvs=kvs
        )
        md += serve_bench.markdown(res)
        for (name, kv), r in zip(kvs, res["rows"], strict=True):
            assert r["kv"] == name and r["kv_config"] == kv and r["peak_bytes"] is None  # (CPU)
            assert r["max_batch"] == top and r["kv_bytes"] == top * r["kv_bytes_per_seq"]
            assert r["tokens"] == reference("none", kv, top), name
            rows[name] = r
    per = {name: r["kv_bytes_per_seq"] for name, r in rows.items()}
    assert per == {
        "none": dense_bytes(),
        "window200": window_bytes(200),
        "int4": quant_bytes(4),
        "lfps8": dense_bytes(),  # LFPS reads fewer keys, it keeps them all
    }
    assert per["int4"] < per["window200"] < per["none"]
    assert f"| {SHAPE} | none | - | int4 | 1 |" in md and f"| {per['int4'] / 2**20:.1f} | - |" in md


def test_kv_row_with_pruning_recovers_from_out_of_memory_in_the_prefill(monkeypatch):
    """fastv + window: an out-of-memory error raised inside the wrapped prefill at batch 2 (a layer's
    hook) ends that attempt only; batch 1's tokens are still generate_fast's for fastv + window."""
    build = bench.build

    def tight(shape, *args, **kw):
        model = build(shape, *args, **kw)

        def limit(module, args):
            if args[0].shape[0] > 1:
                raise torch.OutOfMemoryError("fake limit inside the prefill")

        model.model.language_model.layers[1].register_forward_pre_hook(limit)
        return model

    monkeypatch.setattr(serve_bench.bench, "build", tight)
    kv = {"window": 200, "sinks": 4}
    torch.manual_seed(0)
    res = serve_bench.serve(
        [SHAPE], [64], ["fastv"], "cpu", torch.float32, dict(OPTS, max_batch=2), kvs=[("window200", kv)]
    )
    monkeypatch.setattr(serve_bench.bench, "build", build)
    (row,) = res["rows"]
    assert row["tried"] == {"1": True, "2": False} and row["max_batch"] == 1
    assert row["tokens"] == reference("fastv", kv, 1)
    assert row["kv_bytes_per_seq"] == row["kv_bytes"] > 0


def test_refused_combinations_are_rows(monkeypatch):
    """A ValueError of mmsink's from generate_fast or wrap: a row with its first line; others raise."""

    def refuse(model, **kw):
        raise ValueError("mmsink: generate_fast does not do this\nsecond line")

    monkeypatch.setattr(mmsink, "generate_fast", refuse)
    kvs = [("window8", {"window": 8, "sinks": 4})]
    res = serve_bench.serve([SHAPE], [64], ["fastv"], "cpu", torch.float32, dict(OPTS, max_batch=4), kvs=kvs)
    (row,) = res["rows"]
    assert row["refused"] == "mmsink: generate_fast does not do this" and "max_batch" not in row
    assert "| fastv | 64 | window8 | refused: mmsink: generate_fast does not do this | - |" in (
        serve_bench.markdown(res)
    )
    model = bench.build(SHAPE)
    bad = {"sparse": "lfps", "topk": 8, "sinks": 8}  # sinks must be < topk: wrap refuses
    assert serve_bench.serve_kv_row(model, {}, "none", None, bad, OPTS, print)["refused"].startswith(
        "mmsink: kv sparse sinks"
    )
    assert mmsink.api.ATTR not in model.__dict__  # nothing left wrapped
    monkeypatch.setattr(mmsink, "generate_fast", lambda model, **kw: int("x"))  # a bug, not a refusal
    with pytest.raises(ValueError, match="invalid literal"):
        serve_bench.serve([SHAPE], [64], ["none"], "cpu", torch.float32, dict(OPTS, max_batch=1), kvs=kvs)


def test_prefill_batch_reaches_generate_fast(monkeypatch):
    """``prefill_batch``: every generate_fast call gets it (the batch prefilled in chunks of 2), the
    row's tokens are generate_fast's (whole prefill) at that batch, the table's text and the result say
    so; absent, the text says the whole batch is prefilled at once."""
    seen = []
    real = mmsink.generate_fast

    def spy(model, **kw):
        seen.append((kw["input_ids"].shape[0], kw["prefill_batch"]))
        return real(model, **kw)

    monkeypatch.setattr(mmsink, "generate_fast", spy)
    torch.manual_seed(0)
    res = serve_bench.serve(
        [SHAPE], [64], ["fastv"], "cpu", torch.float32, dict(OPTS, max_batch=3, prefill_batch=2)
    )
    (row,) = res["rows"]
    assert row["max_batch"] == 3 and {p for _, p in seen} == {2} and max(b for b, _ in seen) == 3
    monkeypatch.setattr(mmsink, "generate_fast", real)
    assert row["tokens"] == reference("fastv", None, 3)
    md = serve_bench.markdown(res)
    assert res["prefill_batch"] == 2 and "Prefill: in row chunks of at most 2 (`prefill_batch=2`" in md
    assert "Prefill: the whole batch at once" in serve_bench.markdown(dict(res, prefill_batch=None))


def test_kv_names():
    assert serve_bench.kv_modes("none, window2048,int4,int2,lfps512") == [
        ("none", None),
        ("window2048", {"window": 2048, "sinks": 4}),
        ("int4", {"quant": "int4", "keep_sinks": True}),
        ("int2", {"quant": "int2", "keep_sinks": True}),
        ("lfps512", {"sparse": "lfps", "topk": 512}),
    ]


@pytest.mark.parametrize("kv", ["window", "window0", "int3", "lfps", "sinks4", "none,", "int4,window-1"])
def test_bad_kv_names_are_one_line_errors(kv, capsys):
    with pytest.raises(SystemExit):
        serve_bench.main(["--device", "cpu", "--kv", kv])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmsink serve-bench: error: --kv: unknown kv mode")
    assert "window<W>" in err[-1] and "lfps<K>" in err[-1]
