"""`mmsink bench` measured rows: the KV-cache bytes follow the plan exactly, the ideal row replays the
method's own plan, and ratios are computed against the baseline of the same run."""

import math

import pytest

from mmsink.tools import bench

# tiny-cpu's depth and token counts (12 layers, 576 visual tokens) at a narrow width: the rows' counts and
# ratios are what these tests check, and the full width's prefills cost most of their time
NARROW = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "text": dict(
        bench.SHAPES["tiny-cpu"]["text"], hidden_size=64, intermediate_size=128, num_attention_heads=4
    ),
}


@pytest.fixture(autouse=True)
def narrow(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny-cpu", NARROW)


def quick(shape, grid, batch=1, **kw):
    """One CPU rep of the bench at float32, one decode token: the plumbing, not the timings."""
    return bench.measure(
        shape, reps=1, batch=batch, device="cpu", dtype=bench.torch.float32, grid=grid, decode_tokens=1, **kw
    )


def test_measured_rows_follow_the_plan():
    # --opt items: FastV's K = 3 (``fastv.k``), another method's item ignored
    res = quick("tiny-cpu", [("fastv", 64)], e2e_tokens=2, var_tau=3.0, opts=["fastv.k=3", "pdrop.x=1"])
    base, fastv, var = res["rows"]
    # the VAR row: every token kept, timed against the model without VAR, its sinks recorded per layer
    assert var["method"] == "var" and var["kept"] == 576 and "ideal_ms" not in var
    assert abs(var["time_ratio"] - var["ms"] / var["base_ms"]) < 1e-12 and var["flops_ratio"] >= 1.0
    assert set(var["var_sink_tokens"]) == set(range(2, 11))  # VAR's default layers 2 .. L-2
    # and through generate_fast (its prefill handed off before layer 0), against the graphed unpruned one
    assert var["fast_ms"] > 0 and var["fast_ttft_ms"] > 0 and min(var["ttft_alt"].values()) > 0
    assert "| var | - |" in bench.measured_markdown(res).split("Prefill + 2 new tokens")[1]
    assert base["method"] == "baseline" and fastv["method"] == "fastv"
    layers, total, text = 12, 1 + 35 + 576 + 29, 1 + 35 + 29
    # FastV keeps everything in layers 0-2 (K=3) and text + 64 visual tokens after: KV bytes in proportion
    expected = (3 * total + (layers - 3) * (text + 64)) / (layers * total)
    assert abs(fastv["kv_ratio"] - expected) < 1e-9
    assert fastv["kept"] == round((3 * 576 + 9 * 64) / 12, 1)
    # ratios against the baseline timed alternately with this method (its own series, not the first row)
    assert fastv["base_ms"] > 0 and abs(fastv["time_ratio"] - fastv["ms"] / fastv["base_ms"]) < 1e-12
    assert abs(fastv["ideal_ratio"] - fastv["ideal_ms"] / fastv["base_ms"]) < 1e-12
    assert 0 < fastv["ideal_ms"] and abs(fastv["of_ideal"] - fastv["ideal_ms"] / fastv["ms"]) < 1e-12
    # decode_ms is a difference of two timed medians (its rule is pinned with a fake clock below): on a
    # loaded CPU one tiny step can come out negative, so only its presence is checked here
    assert fastv["flops_ratio"] < 0.5 and math.isfinite(fastv["decode_ms"]) and fastv["ttft_ms"] > 0
    assert fastv["e2e_ms"] > 0 and fastv["fast_ms"] > 0 and fastv["fast_ttft_ms"] > 0
    assert base["fast_ttft_graphed_ms"] > 0 and "graphed unpruned" in bench.measured_markdown(res)
    md = bench.measured_markdown(res)
    assert "| fastv | 64 |" in md and "ideal ratio" in md and "generate_fast ms" in md
    t = fastv["ttft_alt"]  # HF prefill, graphed unpruned and the method, alternated
    assert set(t) == {"hf_prefill_ms", "graphed_unpruned_ms", "method_ms"} and min(t.values()) > 0
    assert "speedup vs HF prefill" in md and "ttft_alt" not in base


def test_llava_next_shape_counts_its_tiles():
    """The NeXT bench feeds one 672x672 image: base + 4 tiles of 24x24 plus a newline per row of the
    unpadded 48x48 grid = 576 + 2304 + 48 tokens, as the model itself packs them; pool shares its budget
    between the two grids."""
    res = quick("tiny-next-cpu", [("fastv", 320), ("pool", 320)])
    assert res["visual_tokens"] == 576 + 2304 + 48
    base, fastv, pool = res["rows"]
    total, text = 1 + 35 + 2928 + 29, 1 + 35 + 29
    assert abs(fastv["kv_ratio"] - (2 * total + 4 * (text + 320)) / (6 * total)) < 1e-9
    assert pool["kept"] == 320  # 8x8 cells of the base tile + 16x16 of the crops, newlines dropped


def test_qwen_shape_one_large_image():
    """The Qwen2-VL bench feeds one image of the shape's patch grid (2x2 patches per token) with vision
    start/end tokens and M-RoPE inputs; the plan's KV bytes follow the kept tokens."""
    res = quick("tiny-qwen-cpu", [("fastv", 64)])
    assert res["visual_tokens"] == 28 * 28 // 4
    base, fastv = res["rows"]
    total, text = 1 + 35 + 2 + 196 + 29, 1 + 35 + 2 + 29
    assert abs(fastv["kv_ratio"] - (2 * total + 4 * (text + 64)) / (6 * total)) < 1e-9


def test_alternated_takes_the_states_in_turn():
    """Each rep enters every state in order and times one call per state (after an untimed call), so
    the medians belong to their own states; the warm-up round is not counted."""
    log, now = [], {"state": None}
    states = {name: (lambda n=name: log.append(("enter", n)) or now.update(state=n)) for name in "abc"}
    calls = []

    def fn():
        calls.append(now["state"])

    res = bench.alternated(fn, states, reps=3)
    assert set(res) == {"a", "b", "c"}
    assert [e[1] for e in log] == list("abc") * 4
    assert calls == [s for s in "abc" for _ in range(2)] * 4
    calls.clear()
    bench.alternated(fn, states, reps=2, warm=2)  # two untimed calls after each switch, then one timed
    assert calls == [s for s in "abc" for _ in range(3)] * 3


def test_ragged_prompts_count_real_tokens_only():
    """``ragged``: samples left-padded by 2 * i tokens; the plan counts the same visual tokens per layer
    (padding is not a token) and the ratios still come from alternated timing."""
    res = quick("tiny-cpu", [("fastv", 64)], batch=3, ragged=True)
    base, fastv = res["rows"]
    assert res["ragged"] and fastv["kept"] == round((2 * 576 + 10 * 64) / 12, 1)
    assert abs(fastv["time_ratio"] - fastv["ms"] / fastv["base_ms"]) < 1e-12
    assert "Ragged prompts" in bench.measured_markdown(res)


def test_decode_column_is_the_difference_of_two_runs():
    """decode ms/token = (median time of 1 + k tokens - median time of 1 token) / k, the two runs taken in
    turn after two untimed calls of each; a fake clock makes the times exact."""
    calls = []
    fake = {1: [0.10, 0.30, 0.11], 9: [0.50, 0.90, 0.52]}  # seconds per timed call, by tokens

    def run(n):
        calls.append(n)

    def clock(fn):
        fn()
        n = calls[-1]
        return fake[n].pop(0)

    ms = bench.decode_step_ms(run, 8, 3, clock)
    assert calls == [1, 9, 1, 9] + [1, 9] * 3
    assert abs(ms - (0.52 - 0.11) / 8 * 1e3) < 1e-9
