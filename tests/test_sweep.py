"""``mmsink sweep`` on a tiny random LLaVA: one row per run in json/md/png, completed runs skipped on a
re-run, an interrupted run resumed, a run whose method fails reported while the others go on."""

import json

import pytest
from mmsink.evals import eval as ev
from mmsink.evals import sweep

LIMIT = 6


def run(model_dir, cache, out, *extra):
    argv = ["--model", str(model_dir), "--bench", "synthvqa", "--scenes", "4", "--cache", str(cache)]
    argv += ["--limit", str(LIMIT), "--batch-size", "3", "--max-new-tokens", "3", "--no-progress"]
    return sweep.main(argv + ["--out", str(out), *map(str, extra)])


@pytest.fixture
def calls(monkeypatch):
    """Counts generation batches per method (the real answer_batch still runs)."""
    seen = []
    real = ev.answer_batch

    def spy(model, *args, **kwargs):
        import mmsink

        pruner = mmsink.api.get_handle(model).pruner
        seen.append(pruner.name if pruner is not None else None)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ev, "answer_batch", spy)
    return seen


def test_sweep_tables_plot_and_skip(model_dir, cache, tmp_path, calls):
    out = tmp_path / "sweep"
    flags = ["--methods", "fastv,random,none", "--budgets", "4,0.5", "--adaptive", "visipruner", "--full"]
    flags += ["--opt", "fastv.k=1"]
    assert run(model_dir, cache, out, *flags) == 0
    names = ["full", "fastv-4", "fastv-0.5", "random-4", "random-0.5", "none", "visipruner-adaptive"]
    data = json.loads((out / "sweep.json").read_text())
    rows = {r["run"]: r for r in data["runs"]}
    assert [r["run"] for r in data["runs"]] == names and data["questions"] == LIMIT
    for r in data["runs"]:
        assert r["answered"] == LIMIT and 0 <= r["accuracy"] <= 1 and len(r["per_category"]) > 1
        assert len((out / f"{r['run']}.jsonl").read_text().splitlines()) == LIMIT
    assert rows["fastv-4"]["options"] == {"k": 1} and rows["random-4"]["options"] == {}
    assert rows["full"]["mean_flops_ratio"] == 1 and rows["full"]["mean_kept_tokens"] == 256
    assert rows["fastv-4"]["mean_kept_tokens"] == (256 + 3 * 4) / 4
    assert rows["random-4"]["mean_kept_tokens"] == 4 and rows["random-0.5"]["mean_kept_tokens"] == 128
    assert rows["random-4"]["mean_flops_ratio"] < rows["random-0.5"]["mean_flops_ratio"] < 1
    assert (rows["none"]["budget"], rows["visipruner-adaptive"]["budget"]) == (None, None)
    table = [x for x in (out / "sweep.md").read_text().splitlines() if x.startswith("| ")]
    assert len(table) == 1 + len(names)  # header + one row per run
    assert "accuracy" in table[0] and "FLOPs ratio" in table[0]
    assert [x.split(" | ")[0][2:] for x in table[1:]] == names
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(calls) == len(names) * 2  # 6 questions in batches of 3

    # re-run: every run is complete, nothing is generated, the same table comes out
    calls.clear()
    md = (out / "sweep.md").read_text()
    assert run(model_dir, cache, out, *flags) == 0
    assert calls == [] and (out / "sweep.md").read_text() == md

    # an interrupted run (score file not yet written, answers torn) resumes; the others stay skipped
    (out / "random-4.jsonl.score.json").unlink()
    answers = out / "random-4.jsonl"
    kept = answers.read_text().splitlines(keepends=True)
    answers.write_text(kept[0] + kept[1][:20])
    assert run(model_dir, cache, out, *flags) == 0
    assert calls == ["random"] * 2  # questions 2..6: two batches
    assert answers.read_text() == "".join(kept)
    assert (out / "sweep.md").read_text() == md


def test_failed_run_is_reported_and_others_go_on(model_dir, cache, tmp_path, capsys):
    out = tmp_path / "sweep"
    # pdrop cannot average 4 of 256 tokens in 4 layers (its first stage comes after layer 0)
    assert run(model_dir, cache, out, "--methods", "pdrop,fastv", "--budgets", "4") == 0
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["run"] for r in rows] == ["pdrop-4", "fastv-4"]
    assert "pdrop cannot reach" in rows[0]["error"] and rows[1]["answered"] == LIMIT
    assert "pdrop-4" in capsys.readouterr().err
    assert "error: " in (out / "sweep.md").read_text()


def test_bad_sweep_arguments(model_dir, cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(model_dir, cache, tmp_path, "--methods", "fastv", "--adaptive", "fastv")
    assert e.value.code == 2 and "no adaptive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(model_dir, cache, tmp_path, "--methods", "nosuch")
    assert "unknown method 'nosuch'" in capsys.readouterr().err
