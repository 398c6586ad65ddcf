"""The commands as a new user meets them: ``mmsink --help``, complete help texts, the README's eval line
without --out, and one clear line (no traceback) for output locations, devices, Ctrl-C and bad budgets."""

import argparse

import pytest
import torch
from mmsink.evals import eval as ev
from mmsink.evals import sweep

from mmsink.tools import cli

SCENES = 2  # 6 questions


def eval_args(model_dir, cache, *extra):
    return [
        "eval",
        "--model",
        str(model_dir),
        "--scenes",
        str(SCENES),
        "--cache",
        str(cache),
        "--max-new-tokens",
        "2",
        "--no-progress",
        "--batch-size",
        "2",
        *map(str, extra),
    ]


def one_error_line(err, command):
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err
    mine = [x for x in lines if x.startswith("mmsink")]
    assert len(mine) == 1 and mine[0].startswith(f"mmsink {command}: "), lines
    return mine[0]


def test_help_lists_every_command_with_a_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out.splitlines()
    for name in cli.COMMANDS:
        line = [x for x in out if x.split() and x.split()[0] == name]
        assert len(line) == 1 and len(line[0].split()) > 3, (name, out)
    assert cli.main([]) == 2 and cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


class Parsed(Exception):
    pass


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_flag_has_help_and_the_description_keeps_its_lines(command, monkeypatch, capsys):
    seen = []

    def grab(self, args=None, namespace=None):
        seen.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(Parsed):
        cli.main([command, "--help"])
    p = seen[0]
    assert p.prog == f"mmsink {command}"
    assert [a.dest for a in p._actions if not a.help] == []
    assert p.formatter_class is argparse.RawDescriptionHelpFormatter  # example lines stay lines
    text = p.format_help()
    assert f"mmsink {command}" in text.split("options:")[0].split("\n", 2)[-1]


def test_readme_eval_line_without_out(model_dir, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(eval_args(model_dir, cache, "--bench", "synthvqa")) == 0
    files = list((tmp_path / "eval").glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 3 * SCENES
    assert f"answers: {files[0].relative_to(tmp_path)}" in capsys.readouterr().err
    assert not list((tmp_path / "eval").glob("*.errors.json"))  # nothing went wrong: no empty list
    # the same command again resumes the same file (nothing left to answer)
    assert cli.main(eval_args(model_dir, cache, "--bench", "synthvqa")) == 0
    assert len(files[0].read_text().splitlines()) == 3 * SCENES


def test_output_location_errors_come_before_the_model(model_dir, cache, tmp_path, monkeypatch, capsys):
    import mmsink.tools.loading as loading

    monkeypatch.setattr(ev, "setup", lambda *a: pytest.fail("loaded before checking --out"))
    (tmp_path / "file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    real = loading.os.access
    monkeypatch.setattr(loading.os, "access", lambda p, m: False if str(p) == str(ro) else real(p, m))
    cases = [
        (tmp_path, "is a folder"),
        (tmp_path / "file" / "a.jsonl", "is a file, not a folder"),
        (ro / "sub" / "a.jsonl", "not writable"),
    ]
    for out, words in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(eval_args(model_dir, cache, "--out", out))
        assert e.value.code == 1 and words in one_error_line(capsys.readouterr().err, "eval")
    with pytest.raises(SystemExit) as e:
        sweep.main(["--model", str(model_dir), "--out", str(tmp_path / "file")])
    assert e.value.code == 1 and "is a file" in one_error_line(capsys.readouterr().err, "sweep")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(model_dir, cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(eval_args(model_dir, cache, "--device", "cuda", "--out", tmp_path / "a.jsonl"))
    assert e.value.code == 1 and "no CUDA device" in one_error_line(capsys.readouterr().err, "eval")


def test_ctrl_c_is_one_line_and_the_run_resumes(model_dir, cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a.jsonl"
    real, calls = ev.answer_batch, []

    def stop_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "answer_batch", stop_second)
    with pytest.raises(SystemExit) as e:
        cli.main(eval_args(model_dir, cache, "--out", out))
    assert e.value.code == 130
    line = one_error_line(capsys.readouterr().err, "eval")
    assert "interrupted" in line and str(out) in line
    assert len(out.read_text().splitlines()) == 2  # the first batch was kept
    monkeypatch.setattr(ev, "answer_batch", real)
    assert cli.main(eval_args(model_dir, cache, "--out", out)) == 0
    assert len(out.read_text().splitlines()) == 3 * SCENES


@pytest.mark.parametrize("budget", ["1.5", "-5", "0", "abc"])
def test_bad_budget_is_one_line_and_writes_nothing(model_dir, cache, tmp_path, budget, capsys):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        sweep.main(
            [
                "--model",
                str(model_dir),
                "--scenes",
                str(SCENES),
                "--cache",
                str(cache),
                "--methods",
                "fastv",
                "--budgets",
                f"4,{budget}",
                "--out",
                str(out),
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"budget {budget}" in one_error_line(err.split("\n", 2)[-1], "sweep")
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        cli.main(eval_args(model_dir, cache, "--prune", "fastv", "--budget", budget, "--out", tmp_path / "a"))
    assert e.value.code == 2 and f"budget {budget}" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
