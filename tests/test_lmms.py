"""Issue 19: lmms-eval end to end on the bundled reference model and exported synthvqa tasks (CPU).

Skipped without lmms-eval (CI installs it: README's test command). Three exported tasks in the formats of
lmms-eval's own vqav2_val, pope and mme, scored by lmms-eval's own functions. ``prune=none`` through
lmms-eval answers as ``mmsink eval`` does and scores as mmsink's own scorers do on those answers;
``fastv`` at ``--batch_size 4`` (batched through mmsink: lmms-eval's llava_hf is batch-1 only) answers as
``mmsink eval --prune fastv`` at batch size 1; the kept tokens and prefill FLOPs lmms-eval logs per
sample are those ``mmsink eval`` takes from ``mmsink.stats``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("datasets")

MODEL = Path(__file__).resolve().parents[1] / "models" / "synthllava"
SCENES, TOKENS = 20, 16  # vqav2's and mme's answer length
LIMITS = {"limit": 16, "pope": 8, "mme": 3}  # 16 VQA, 8 POPE, 12 MME questions (3 images x 2 pairs)
TASKS = ("synthvqa", "synthvqa_pope", "synthvqa_mme")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from mmsink.lmms.export import export

    root = tmp_path_factory.mktemp("lmms")
    ids = export(root / "task", scenes=SCENES, cache=root / "cache", max_new_tokens=TOKENS, **LIMITS)
    return root, ids


def env():
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**os.environ, **offline}


def lmms_eval(root: Path, name: str, wrap_args: str, batch_size=1, model=MODEL, tasks=TASKS, limit=None):
    """{task: logged samples in document order}, the results file."""
    out = root / "runs" / name
    args = f"pretrained={model},family=llava_hf,device=cpu,dtype=float32,device_map=cpu,{wrap_args}"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mmsink", "--model_args", args]
    cmd += ["--include_path", str(root / "task"), "--tasks", ",".join(tasks), "--batch_size", str(batch_size)]
    cmd += ["--log_samples", "--output_path", str(out)] + (["--limit", str(limit)] if limit else [])
    done = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = {}
    for t in tasks:
        (path,) = out.rglob(f"*_samples_{t}.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[t] = sorted(rows, key=lambda r: int(r["doc_id"]))
    (results,) = out.rglob("*_results.json")
    return samples, json.loads(results.read_text())


def mmsink_eval(root: Path, name: str, *extra, model=MODEL) -> dict:
    """{question id: mmsink eval's record} for the exported questions (batch size 1)."""
    out, bench = root / f"{name}.jsonl", root / "task" / "mmsink"
    cmd = [sys.executable, "-m", "mmsink", "eval", "--model", str(model)]
    cmd += ["--bench", str(bench / "questions.jsonl")]
    cmd += ["--images", str(root / "task" / "images"), "--answers", str(bench / "answers.jsonl")]
    cmd += ["--device", "cpu", "--batch-size", "1", "--max-new-tokens", str(TOKENS), "--no-progress"]
    cmd += ["--out", str(out), *extra]
    done = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["question_id"]: r for r in map(json.loads, out.read_text().splitlines())}


def check_same(samples: dict, ids: dict, answers: dict) -> None:
    for t in samples:
        assert len(samples[t]) == len(ids[t]) and ids[t]
        for s, qid in zip(samples[t], ids[t]):
            a = answers[qid]
            assert s["input"] == a["prompt"]  # the same question
            assert s["filtered_resps"] == a["text"], (qid, s["filtered_resps"], a["text"])
            logged, meta = s["token_counts"][0]["mmsink"], a["metadata"]
            for key in ("kept_tokens", "kept_tokens_final", "prefill_flops", "baseline_prefill_flops"):
                assert logged[key] == meta[key], (qid, key, logged[key], meta[key])


def test_none_same_answers_and_scores(task):
    from mmsink.evals.scorers import exact_match, mme_scores, pope_metrics

    root, ids = task
    samples, results = lmms_eval(root, "none", "prune=none")
    answers = mmsink_eval(root, "none")
    check_same(samples, ids, answers)
    assert all(s["token_counts"][0]["mmsink"]["kept_tokens_final"] == 256 for t in TASKS for s in samples[t])
    assert results["throughput"]["avg_mmsink_flops_ratio"] == pytest.approx(1.0)
    scores = results["results"]
    key = {r["question_id"]: r for r in map(json.loads, (root / "task/mmsink/answers.jsonl").open())}
    image = {
        r["question_id"]: r["image"] for r in map(json.loads, (root / "task/mmsink/questions.jsonl").open())
    }

    text = [answers[q]["text"] for q in ids["synthvqa"]]
    vqa = sum(exact_match(a, key[q]["answer"]) for a, q in zip(text, ids["synthvqa"])) / len(text)
    assert scores["synthvqa"]["exact_match,none"] == pytest.approx(vqa)

    text = [answers[q]["text"] for q in ids["synthvqa_pope"]]
    assert set(text) <= {"yes", "no"}  # where lmms-eval's and POPE's answer rules agree
    pope = pope_metrics(text, [key[q]["answer"] for q in ids["synthvqa_pope"]])
    for metric in ("accuracy", "precision", "recall"):
        assert scores["synthvqa_pope"][f"pope_{metric},none"] == pytest.approx(pope[metric])
    assert scores["synthvqa_pope"]["pope_f1_score,none"] == pytest.approx(pope["f1"])

    records = [
        {"subtask": key[q]["category"], "image": image[q], "prediction": answers[q]["text"]}
        | {"answer": key[q]["answer"]}
        for q in ids["synthvqa_mme"]
    ]
    mme = mme_scores(records)["totals"]["perception"]
    assert scores["synthvqa_mme"]["mme_perception_score,none"] == pytest.approx(mme)


@pytest.mark.slow  # lmms-eval: test_none_same_answers_and_scores; pruned batches: tests/test_batching.py
def test_fastv_batched_same_answers_and_kept_tokens(task):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import mmsink
    from mmsink.tools.loading import prompt_for

    root, ids = task
    samples, results = lmms_eval(root, "fastv", "prune=fastv,budget=64,k=3", batch_size=4)
    answers = mmsink_eval(root, "fastv", "--prune", "fastv", "--budget", "64", "--opt", "k=3")
    check_same(samples, ids, answers)  # batches of 4 through lmms-eval == batch size 1 through mmsink eval
    logged = [s["token_counts"][0]["mmsink"] for t in TASKS for s in samples[t]]
    assert max(f["batch_size"] for f in logged) == 4  # generate really ran on batches
    assert logged[0]["method"] == "fastv" and logged[0]["kept_tokens_final"] == 64
    assert logged[0]["kept_tokens_per_layer"] == [256] * 3 + [64] * 5  # k=3 reached lmms-eval's --model_args
    mean = sum(f["kept_tokens"] for f in logged) / len(logged)
    assert results["throughput"]["avg_mmsink_kept_tokens"] == pytest.approx(mean)

    # and mmsink.stats itself, on the first VQA question, in this process
    model = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(MODEL)
    mmsink.wrap(model, prune="fastv", budget=64, k=3)
    q = json.loads((root / "task" / "mmsink" / "questions.jsonl").open().readline())
    image = Image.open(root / "task" / "images" / q["image"]).convert("RGB")
    enc = processor(images=[image], text=[prompt_for(processor, q["text"])], return_tensors="pt")
    with torch.inference_mode():  # generate's prefill (lm_head on the last position only), as lmms-eval's
        model.generate(**enc, max_new_tokens=1, do_sample=False)
    s = mmsink.stats(model)
    first = samples["synthvqa"][0]["token_counts"][0]["mmsink"]
    assert first["kept_tokens_per_layer"] == [layer[0] for layer in s.kept_tokens]
    assert first["prefill_flops"] == s.extra["sample_prefill_flops"][0]


@pytest.mark.slow  # lmms-eval's path: test_none_same_answers_and_scores; NeXT's batches: tests/test_fast.py
def test_llava_next_batched_same_answers(task, tmp_path):
    """LLaVA-NeXT (a tiny random checkpoint) through lmms-eval's llava_hf adapter, batches of 2 (tiles of
    several images in one pixel_values) against mmsink eval at batch size 1."""
    from saved import save_llava_next

    root, ids = task
    model = save_llava_next(tmp_path / "next")
    n = 4
    samples, _ = lmms_eval(root, "next", "prune=fastv,budget=0.5,k=1", 2, model, ("synthvqa",), limit=n)
    answers = mmsink_eval(
        root, "next", "--prune", "fastv", "--budget", "0.5", "--opt", "k=1", "--limit", str(n), model=model
    )
    check_same(samples, {"synthvqa": ids["synthvqa"][:n]}, answers)
    logged = [s["token_counts"][0]["mmsink"] for s in samples["synthvqa"]]
    assert [f["batch_size"] for f in logged] == [2] * n
    assert all(f["kept_tokens_final"] < f["visual_tokens"] for f in logged)


def test_batch_inputs_equal_the_processors_batch(tmp_path):
    """Requests built one at a time and joined by mmsink.lmms.batching equal the processor's own padded batch
    (LLaVA-NeXT: images of other shapes give other tile counts, prompts of other lengths)."""
    import torch
    from PIL import Image
    from saved import save_llava_next
    from transformers import AutoProcessor

    from mmsink.lmms.batching import batch_inputs

    processor = AutoProcessor.from_pretrained(save_llava_next(tmp_path / "next"))
    processor.tokenizer.padding_side = "left"
    images = [Image.new("RGB", (224, 224), "red"), Image.new("RGB", (300, 100), "blue")]
    texts = [
        "<image>\nWhat color is the square?",
        "<image>\nIs there a red shape? How many circles are there?",
    ]
    one = [dict(processor(images=[i], text=[t], return_tensors="pt")) for i, t in zip(images, texts)]
    both = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert one[0]["pixel_values"].shape[1] != one[1]["pixel_values"].shape[1]  # other tile counts
    joined = batch_inputs(one, processor.tokenizer.pad_token_id)
    assert set(joined) == set(both)
    for key, value in both.items():
        assert torch.equal(joined[key], value), key
