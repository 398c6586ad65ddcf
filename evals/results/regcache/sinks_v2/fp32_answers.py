"""The fp32 answers behind regcache.py's accuracy column, per question, for one or more models.

Same 60 questions, prompts, batches of 10 and 4 new tokens as ``evals/regcache.py`` (whose JSON keeps
only the accuracy); run from the repository root with ``PYTHONPATH=.``:

    python evals/results/regcache/sinks_v2/fp32_answers.py v2=models/synthllava-sinks v1=/tmp/v1model \
        --out evals/results/regcache/sinks_v2/fp32_answers.json

where /tmp/v1model holds version 1's files: ``for f in $(git ls-tree --name-only a3d9827
models/synthllava-sinks/); do git show a3d9827:$f > /tmp/v1model/$(basename $f); done``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections import Counter
from pathlib import Path

import torch
import transformers

from evals.regcache import encode
from evals.scorers import vqa_accuracy
from evals.synthvqa import make_questions, make_scenes, render_scene
from mmsink.tools.loading import load_model, prompt_for


def answers(path: str, n: int, seed: int) -> list[dict]:
    model, processor = load_model(path, "cpu", "float32")
    scenes = make_scenes("test", n, seed)
    qs, ans = make_questions(scenes, "test", seed, questions_per_scene=1)
    qs, ans = qs[:n], ans[:n]
    images = {q["image"]: render_scene(s) for q, s in zip(qs, scenes, strict=False)}
    preds = []
    with torch.inference_mode():
        for s in range(0, n, 10):
            b = qs[s : s + 10]
            enc = encode(
                processor,
                [prompt_for(processor, q["text"]) for q in b],
                [images[q["image"]] for q in b],
                model.dtype,
            )
            out = model.generate(
                **enc, max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
            )
            new = out[:, enc["input_ids"].shape[1] :]
            preds += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [
        {
            "question_id": q["question_id"],
            "category": q["category"],
            "answer": str(a["answer"]),
            "prediction": p.strip(),
            "score": vqa_accuracy(p.strip(), str(a["answer"])),
        }
        for q, a, p in zip(qs, ans, preds, strict=True)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="LABEL=PATH")
    p.add_argument("--questions", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    pairs = [m.split("=", 1) for m in a.models]
    for m in pairs:
        if len(m) != 2 or not Path(m[1]).is_dir():
            p.error(f"expected LABEL=PATH with PATH a model folder, got {'='.join(m)!r}")
    torch.set_num_threads(2)
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"CPU ({platform.machine()}), 2 cores, shared with other jobs; torch threads 2",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "models": {},
    }
    for label, path in pairs:
        rows = answers(path, a.questions, a.seed)
        wrong = Counter(r["category"] for r in rows if r["score"] < 1)
        result["models"][label] = {
            "path": path,
            "accuracy": round(100 * sum(r["score"] for r in rows) / len(rows), 2),
            "wrong_by_category": dict(sorted(wrong.items())),
            "rows": rows,
        }
        print(label, result["models"][label]["accuracy"], dict(wrong))
    a.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
