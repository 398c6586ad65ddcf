"""Issue 19: lmms-eval end to end on the bundled reference model and an exported synthvqa task (CPU).

Skipped without the ``[lmms]`` extra. ``prune=none`` through lmms-eval answers as ``mmsink eval`` does
(and scores the same), ``fastv`` answers as ``mmsink eval --prune fastv``, and the kept tokens / prefill
FLOPs lmms-eval logs per sample are those ``mmsink eval`` takes from ``mmsink.stats``."""

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
SCENES, LIMIT, TOKENS = 12, 36, 16  # 36 questions; vqav2's answer length


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from mmsink.lmms.export import export

    root = tmp_path_factory.mktemp("lmms")
    export(root / "task", limit=LIMIT, scenes=SCENES, cache=root / "cache", max_new_tokens=TOKENS)
    return root


def env():
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**os.environ, **offline}


def lmms_eval(root: Path, name: str, wrap_args: str, batch_size=1):
    out = root / "runs" / name
    args = f"pretrained={MODEL},family=llava_hf,device=cpu,dtype=float32,device_map=cpu,{wrap_args}"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mmsink", "--model_args", args]
    cmd += ["--include_path", str(root / "task"), "--tasks", "synthvqa", "--batch_size", str(batch_size)]
    cmd += ["--log_samples", "--output_path", str(out)]
    done = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (samples,) = out.rglob("*_samples_synthvqa.jsonl")
    (results,) = out.rglob("*_results.json")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    return rows, json.loads(results.read_text())


def mmsink_eval(root: Path, name: str, *extra):
    out = root / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "mmsink", "eval", "--model", str(MODEL), "--bench", "synthvqa"]
    cmd += ["--scenes", str(SCENES), "--limit", str(LIMIT), "--cache", str(root / "cache"), "--device", "cpu"]
    cmd += ["--batch-size", "1", "--max-new-tokens", str(TOKENS), "--no-progress", "--out", str(out), *extra]
    done = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def check_same(samples, answers):
    assert len(samples) == len(answers) == LIMIT
    for s, a in zip(samples, answers):
        assert s["input"] == a["prompt"]  # the same question, in the same order
        assert s["filtered_resps"] == a["text"], (a["question_id"], s["filtered_resps"], a["text"])
        logged, meta = s["token_counts"][0]["mmsink"], a["metadata"]
        for key in ("kept_tokens", "kept_tokens_final", "prefill_flops", "baseline_prefill_flops"):
            assert logged[key] == meta[key], (a["question_id"], key, logged[key], meta[key])


def test_none_same_answers_and_score(task):
    from mmsink.evals.scorers import exact_match

    samples, results = lmms_eval(task, "none", "prune=none")
    answers = mmsink_eval(task, "none")
    check_same(samples, answers)
    assert all(s["token_counts"][0]["mmsink"]["kept_tokens_final"] == 256 for s in samples)
    ours = sum(exact_match(a["text"], s["target"]) for s, a in zip(samples, answers)) / LIMIT
    assert results["results"]["synthvqa"]["exact_match,none"] == pytest.approx(ours)
    assert results["throughput"]["avg_mmsink_flops_ratio"] == pytest.approx(1.0)


def test_fastv_same_answers_and_kept_tokens(task):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import mmsink
    from mmsink.tools.loading import prompt_for

    samples, results = lmms_eval(task, "fastv", "prune=fastv,budget=64,k=3", batch_size=4)
    answers = mmsink_eval(task, "fastv", "--prune", "fastv", "--budget", "64", "--opt", "k=3")
    check_same(samples, answers)
    logged = samples[0]["token_counts"][0]["mmsink"]
    assert logged["method"] == "fastv" and logged["kept_tokens_final"] == 64
    assert logged["kept_tokens_per_layer"] == [256] * 3 + [64] * 5  # k=3 reached lmms-eval's --model_args
    n = len(samples)
    mean = sum(s["token_counts"][0]["mmsink"]["kept_tokens"] for s in samples) / n
    assert results["throughput"]["avg_mmsink_kept_tokens"] == pytest.approx(mean)

    # and mmsink.stats itself, on the first question, in this process
    model = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(MODEL)
    mmsink.wrap(model, prune="fastv", budget=64, k=3)
    q = json.loads((task / "cache" / f"synthvqa-0-{SCENES}" / "test_questions.jsonl").open().readline())
    image = Image.open(task / "cache" / f"synthvqa-0-{SCENES}" / "images" / q["image"]).convert("RGB")
    enc = processor(images=[image], text=[prompt_for(processor, q["text"])], return_tensors="pt")
    with torch.inference_mode():  # generate's prefill (lm_head on the last position only), as lmms-eval's
        model.generate(**enc, max_new_tokens=1, do_sample=False)
    s = mmsink.stats(model)
    assert logged["kept_tokens_per_layer"] == [layer[0] for layer in s.kept_tokens]
    assert logged["prefill_flops"] == s.extra["sample_prefill_flops"][0]
