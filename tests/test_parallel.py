"""Data-parallel ``mmsink eval`` / ``mmsink sweep`` (``--num-processes 2``, gloo on CPU): the same answers
file as one process, resume from an interrupted run (parts kept, a torn line dropped), disjoint shards."""

import json

import pytest
from mmsink.evals import eval as ev
from mmsink.evals import parallel, sweep
from test_eval import lines

SCENES = 4  # 12 questions


def run(model_dir, cache, out, *extra):
    argv = ["--model", str(model_dir), "--bench", "synthvqa", "--scenes", str(SCENES), "--cache", str(cache)]
    argv += ["--prune", "fastv", "--budget", "4", "--opt", "k=1", "--max-new-tokens", "3", "--no-progress"]
    return ev.main(argv + ["--out", str(out), *map(str, extra)])


@pytest.fixture(scope="module")
def single(model_dir, cache, tmp_path_factory):
    """The single-process answers file (batches of 2), the reference of every parallel run."""
    out = tmp_path_factory.mktemp("single") / "a.jsonl"
    assert run(model_dir, cache, out, "--batch-size", 2) == 0
    return out


def test_shards_are_disjoint_balanced_and_cover():
    items = list(range(11))
    shards = [parallel.shard(items, 2, r, 3) for r in range(3)]
    assert shards == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10]]
    assert sorted(sum(shards, [])) == items
    assert parallel.shard(items, 4) == items  # one process: everything, in order


def test_two_processes_write_the_single_process_file(model_dir, cache, single, tmp_path):
    out = tmp_path / "a.jsonl"
    assert run(model_dir, cache, out, "--batch-size", 2, "--num-processes", 2) == 0
    assert out.read_text() == single.read_text()  # same batches, so even the FLOPs match
    assert parallel.parts(out) == []  # merged, then removed
    score, ref = (json.loads((p.parent / (p.name + ".score.json")).read_text()) for p in (out, single))
    assert score == ref and score["answered"] == 3 * SCENES


def test_interrupted_parallel_run_resumes(model_dir, cache, single, tmp_path):
    out = tmp_path / "a.jsonl"
    ref = lines(single)
    assert run(model_dir, cache, out, "--batch-size", 2, "--limit", 5, "--num-processes", 2) == 0
    pick = [(r["question_id"], r["text"]) for r in ref]
    assert [(r["question_id"], r["text"]) for r in lines(out)] == pick[:5]  # batch [4] differs: FLOPs move
    # a second run killed mid-way: each rank left part of its shard, rank 1 with a torn last line
    text = single.read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl.part0.jsonl").write_text(text[5] + text[6])
    (tmp_path / "a.jsonl.part1.jsonl").write_text(text[7] + text[8][:30])
    assert run(model_dir, cache, out, "--batch-size", 2, "--num-processes", 2) == 0
    assert [(r["question_id"], r["text"]) for r in lines(out)] == pick  # each once, in question order
    assert parallel.parts(out) == []


def test_parallel_sweep_equals_single_process(model_dir, cache, tmp_path):
    argv = ["--model", str(model_dir), "--bench", "synthvqa", "--scenes", str(SCENES), "--cache", str(cache)]
    argv += ["--limit", "4", "--batch-size", "1", "--max-new-tokens", "3", "--no-progress"]
    argv += ["--methods", "random", "--budgets", "4"]
    assert sweep.main(argv + ["--out", str(tmp_path / "one")]) == 0
    assert sweep.main(argv + ["--out", str(tmp_path / "two"), "--num-processes", "2"]) == 0
    for name in ("random-4.jsonl", "random-4.jsonl.score.json", "sweep.json", "sweep.md"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
