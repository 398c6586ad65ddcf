"""``mmsink eval`` on a tiny random LLaVA: answers file fields, resume, batched = per-sample, pruning
facts in the metadata, bad records reported while the rest is answered. Answers are garbage (random
weights); these tests check the plumbing, not accuracy."""

import json

import pytest
import torch
from mmsink.evals import eval as ev
from mmsink.evals import synthvqa
from mmsink.evals.reference_model import SYSTEM, build_config, build_processor, build_tokenizer
from transformers import LlavaForConditionalGeneration

SCENES = 10  # 30 questions
LAYERS = 4


def make_model(path):
    """A 4-layer random LLaVA with the reference tokenizer and chat template (256 visual tokens)."""
    data = synthvqa.generate("train", 20, seed=0)
    corpus = [SYSTEM] + [q["text"] for q in data.questions] + [a["answer"] for a in data.answers]
    tok = build_tokenizer(corpus, vocab_size=400)
    torch.manual_seed(0)
    cfg = build_config(tok, size="test")
    cfg.text_config.num_hidden_layers = LAYERS
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    build_processor(tok).save_pretrained(path)
    return path


def run(model_dir, cache, out, *extra):
    argv = ["--model", str(model_dir), "--bench", "synthvqa", "--scenes", str(SCENES), "--cache", str(cache)]
    argv += ["--max-new-tokens", "4", "--no-progress", "--out", str(out), *map(str, extra)]
    return ev.main(argv)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def question_ids(cache):
    path = cache / f"synthvqa-0-{SCENES}" / "test_questions.jsonl"
    return [q["question_id"] for q in lines(path)]


def test_answers_file_fields_and_pruning_facts(model_dir, cache, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    from mmsink.tools.cli import main as cli  # through the real command

    assert (
        cli(
            ["eval", "--model", str(model_dir), "--scenes", str(SCENES), "--cache", str(cache)]
            + ["--prune", "fastv", "--budget", "4", "--opt", "k=1", "--batch-size", "4"]
            + ["--max-new-tokens", "4", "--no-progress", "--out", str(out)]
        )
        == 0
    )
    recs = lines(out)
    assert [r["question_id"] for r in recs] == question_ids(cache)
    for r in recs:
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["model_id"].split("@")[0] == model_dir.name and isinstance(r["text"], str) and r["prompt"]
        m = r["metadata"]
        assert (m["method"], m["budget"], m["options"]) == ("fastv", 4, {"k": 1})
        # layer 0 sees all 256 visual tokens, layers 1..3 the 4 kept ones
        assert m["kept_tokens"] == (256 + 4 * (LAYERS - 1)) / LAYERS
        assert 0 < m["prefill_flops"] < m["baseline_prefill_flops"]
    assert len({r["answer_id"] for r in recs}) == len(recs)
    score = json.loads((tmp_path / "a.jsonl.score.json").read_text())
    assert score["answered"] == score["n"] == 30 and score["missing"] == 0
    assert set(score["per_category"]) == set(synthvqa.CATEGORIES)
    assert score["mean_kept_tokens"] == 67 and 0 < score["mean_flops_ratio"] < 1
    assert not (tmp_path / "a.jsonl.errors.json").exists()  # no problem: no empty list (issue 22)
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "holistic" in printed and "FLOPs ratio" in printed


def test_unpruned_run_has_stats(model_dir, cache, tmp_path):
    out = tmp_path / "full.jsonl"
    run(model_dir, cache, out, "--limit", 5)
    for r in lines(out):
        m = r["metadata"]
        assert m["method"] is None and m["kept_tokens"] == 256
        assert m["prefill_flops"] == m["baseline_prefill_flops"] > 0


def test_resume_after_limit_and_after_torn_line(model_dir, cache, tmp_path):
    out = tmp_path / "a.jsonl"
    ids = question_ids(cache)
    run(model_dir, cache, out, "--prune", "random", "--budget", 8, "--limit", 7, "--batch-size", 3)
    first = out.read_text()
    assert [r["question_id"] for r in lines(out)] == ids[:7]
    run(model_dir, cache, out, "--prune", "random", "--budget", 8, "--batch-size", 3)
    assert out.read_text().startswith(first)  # earlier answers are kept, not redone
    assert [r["question_id"] for r in lines(out)] == ids
    # a run killed mid-write: drop the last 5 answers and cut the line before them in half
    text = out.read_text().splitlines(keepends=True)
    torn = "".join(text[:-6]) + text[-6][: len(text[-6]) // 2]
    out.write_text(torn)
    run(model_dir, cache, out, "--prune", "random", "--budget", 8, "--batch-size", 3)
    assert [r["question_id"] for r in lines(out)] == ids
    assert out.read_text() == "".join(text)  # same answers (deterministic), each once


def test_resume_refuses_other_settings(model_dir, cache, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    run(model_dir, cache, out, "--prune", "fastv", "--budget", 4, "--limit", 2)
    with pytest.raises(SystemExit) as e:
        run(model_dir, cache, out, "--prune", "fastv", "--budget", 8)
    assert e.value.code == 1
    assert "other settings (budget differ" in capsys.readouterr().err
    assert len(lines(out)) == 2
    # same ids, other questions (another synthvqa seed)
    with pytest.raises(SystemExit):
        run(model_dir, cache, out, "--prune", "fastv", "--budget", 4, "--seed", 1, "--limit", 4)
    assert "answers another question under question_id test_0000" in capsys.readouterr().err


def test_resume_refuses_other_weights_under_the_same_name(model_dir, cache, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    retrained = make_model(tmp_path / model_dir.name)  # same folder name, other weights
    from safetensors.torch import load_file, save_file

    shard = next(retrained.glob("*.safetensors"))
    weights = load_file(shard)
    save_file({k: v + 0.01 for k, v in weights.items()}, shard, metadata={"format": "pt"})
    run(model_dir, cache, out, "--prune", "fastv", "--budget", 4, "--limit", 2)
    with pytest.raises(SystemExit) as e:
        run(retrained, cache, out, "--prune", "fastv", "--budget", 4, "--limit", 4)
    assert e.value.code == 1
    assert "other settings (model_id differ" in capsys.readouterr().err
    assert len(lines(out)) == 2


def test_batched_answers_equal_per_sample(model_dir, cache, tmp_path):
    for bs in (1, 5):
        run(
            model_dir,
            cache,
            tmp_path / f"b{bs}.jsonl",
            "--prune",
            "fastv",
            "--budget",
            4,
            "--limit",
            10,
            "--batch-size",
            bs,
        )
    one, many = lines(tmp_path / "b1.jsonl"), lines(tmp_path / "b5.jsonl")
    assert [r["text"] for r in one] == [r["text"] for r in many]
    assert len({r["text"] for r in one}) > 1  # not one constant answer: the comparison means something
    for a, b in zip(one, many):
        assert a["metadata"]["kept_tokens"] == b["metadata"]["kept_tokens"]
        assert a["metadata"]["baseline_prefill_flops"] == b["metadata"]["baseline_prefill_flops"]
        # the batch's selection work is shared out evenly, so per-sample FLOPs may move a hair
        assert a["metadata"]["prefill_flops"] == pytest.approx(b["metadata"]["prefill_flops"], rel=1e-4)


def test_bad_records_are_reported_and_the_rest_answered(model_dir, cache, tmp_path, capsys):
    folder = cache / f"synthvqa-0-{SCENES}"
    if not folder.exists():
        run(model_dir, cache, tmp_path / "warm.jsonl", "--limit", 1)
    good = lines(folder / "test_questions.jsonl")[:4]
    images = folder / "images"
    (tmp_path / "broken.png").write_text("not a png")
    bad = [
        {**good[0], "question_id": "q_missing", "image": "nope.png"},
        {**good[0], "question_id": "q_empty", "text": "  "},
        {**good[0], "question_id": "q_unreadable", "image": str(tmp_path / "broken.png")},
        {**good[0], "question_id": "q_category", "category": "astrology"},
    ]
    rows = (
        [json.dumps(r) for r in good[:2] + bad[:2]]
        + ['{"question_id": "q_torn", "text']
        + [json.dumps(r) for r in bad[2:] + good[2:]]
    )
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("\n".join(rows) + "\n")
    key = lines(folder / "test_answers.jsonl")
    key += [{"question_id": r["question_id"], "answer": "red", "category": "color"} for r in bad]
    kfile = tmp_path / "key.jsonl"
    kfile.write_text("".join(json.dumps(r) + "\n" for r in key))
    out = tmp_path / "a.jsonl"
    assert (
        ev.main(
            [
                "--model",
                str(model_dir),
                "--bench",
                str(qfile),
                "--images",
                str(images),
                "--answers",
                str(kfile),
                "--max-new-tokens",
                "3",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert [r["question_id"] for r in lines(out)] == [q["question_id"] for q in good]
    err = capsys.readouterr().err
    assert "line 5: malformed JSON" in err
    assert "question_id q_missing (line 3): image file not found" in err
    assert "question_id q_empty (line 4): empty question text" in err
    assert "question_id q_unreadable (line 6): unreadable image" in err
    assert "question_id q_category (line 7): unknown category 'astrology'" in err
    errors = json.loads((tmp_path / "a.jsonl.errors.json").read_text())
    assert sorted(str(e["question_id"] or e["line"]) for e in errors) == sorted(
        ["5", "q_missing", "q_empty", "q_unreadable", "q_category"]
    )
    score = json.loads((tmp_path / "a.jsonl.score.json").read_text())
    assert score["answered"] == 4 and score["problems"] == 5 and score["questions"] == 9
    assert score["missing"] == 2  # the two unreadable images count as unanswered (wrong)


def test_nothing_answerable_exits_1(model_dir, tmp_path, capsys):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "image": "gone.png", "text": "What?"}) + "\n")
    with pytest.raises(SystemExit) as e:
        ev.main(
            [
                "--model",
                str(model_dir),
                "--bench",
                str(qfile),
                "--images",
                str(tmp_path),
                "--no-progress",
                "--out",
                str(tmp_path / "a.jsonl"),
            ]
        )
    assert e.value.code == 1
    assert "question_id 1 (line 1): image file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prune", "fastv", "--budget", "9999"], "larger than the image"),
        (["--prune", "nosuch"], "unknown method 'nosuch'"),
        (["--prune", "fastv", "--opt", "bogus=1"], "does not take option(s) ['bogus']"),
        (["--budget", "4"], "budget and method options need a method"),
        (["--var"], "cannot apply full +var"),
    ],
)
def test_bad_settings_are_clear_errors(model_dir, cache, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        run(model_dir, cache, tmp_path / "a.jsonl", "--limit", 2, *flags)
    assert e.value.code == 1
    assert message in capsys.readouterr().err


def test_var_settings_pass_through(model_dir, cache, tmp_path):
    out = tmp_path / "a.jsonl"
    run(
        model_dir,
        cache,
        out,
        "--prune",
        "fastv",
        "--budget",
        4,
        "--var",
        '{"sink_dims": [1, 5]}',
        "--limit",
        2,
    )
    assert [r["metadata"]["var"] for r in lines(out)] == [{"sink_dims": [1, 5]}] * 2


def test_fast_decoding_writes_the_same_answers(model_dir, cache, tmp_path):
    """--fast (mmsink.generate_fast) gives byte-identical answers files to generate, pruned or not, and
    with VAR on (the plumbing; that the decode step reproduces VAR's edit token for token is
    test_fast.py's test_var_decode)."""
    var = ["--var", '{"sink_dims": [3, 17], "tau": 2.4}']
    for extra in ([], ["--prune", "fastv", "--budget", "16"], ["--prune", "fastv", "--budget", "16", *var]):
        a, b = tmp_path / f"a{len(extra)}.jsonl", tmp_path / f"b{len(extra)}.jsonl"
        assert run(model_dir, cache, a, "--batch-size", 3, *extra) == 0
        assert run(model_dir, cache, b, "--batch-size", 3, "--fast", *extra) == 0
        assert a.read_text() == b.read_text()
