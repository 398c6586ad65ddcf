"""``mmsink serve-bench``: the batch search finds the largest batch under an injected memory limit, and
tokens/s is batch x new tokens over the median of the recorded call times."""

import statistics

import pytest
import torch

from mmsink.tools import serve_bench


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
    assert "| tiny-cpu | fastv | 64 | 2 |" in serve_bench.markdown(res) and "clock" not in res


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--shapes", "tiny-cpu,tiny-next-cpu", "--budgets", "64"], "one budget per shape"),
        (["--shapes", "tiny-qwen-cpu"], "LLaVA families"),
    ],
)
def test_bad_settings_are_one_line_errors(argv, msg, capsys):
    with pytest.raises(SystemExit):
        serve_bench.main(argv + ["--device", "cpu"])
    assert msg in capsys.readouterr().err
