"""``mmsink export-lmms``: synthvqa as a ``datasets`` dataset on disk plus an lmms-eval task that reads it.

    mmsink export-lmms --out DIR [--limit 48] [--scenes 700] [--seed 0] [--task synthvqa]
    lmms-eval --model mmsink --model_args pretrained=PATH,prune=fastv,budget=64 \\
        --include_path DIR --tasks synthvqa --log_samples --output_path runs/

DIR/data is the test split (first ``--limit`` questions, question order) saved with ``save_to_disk`` as a
DatasetDict with one split, ``validation``; DIR/<task>.yaml is lmms-eval's ``vqav2_val`` task pointed at
it (``dataset_kwargs: {load_from_disk: true}``): a document has VQAv2's fields (``question_id``, ``image``,
``question``, ``answers``: the answer ten times, as ten annotators would give it, so that VQAv2's
leave-one-out accuracy is 1 for a match and 0 otherwise, mmsink's exact match), and DIR/utils.py
imports lmms-eval's own ``vqav2`` prompt and scoring functions. The prompt is synthvqa's own: the question
with "Answer the question using a single word or phrase." (lmms-eval's post_prompt); answers are up to
``--max-new-tokens`` tokens (default 16, as vqav2). Needs the ``[lmms]`` extra (``datasets``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmsink.evals import vqa
from mmsink.evals.synthvqa import PROMPT_SUFFIX
from mmsink.tools.loading import parser

UTILS = '''"""lmms-eval's own VQAv2 functions (written by ``mmsink export-lmms``)."""

from lmms_eval.tasks.vqav2.utils import (  # noqa: F401
    vqav2_doc_to_text,
    vqav2_doc_to_visual,
    vqav2_process_results_val,
)
'''

ANNOTATORS = 10  # VQAv2's answers per question


def task_yaml(task: str, data: Path, max_new_tokens: int) -> str:
    """lmms-eval's vqav2_val task (its template, inlined) reading the dataset at ``data``."""
    return f"""task: {task}
dataset_path: {json.dumps(str(data.resolve()))}
dataset_kwargs:
  load_from_disk: true
test_split: validation
output_type: generate_until
doc_to_visual: !function utils.vqav2_doc_to_visual
doc_to_text: !function utils.vqav2_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: {int(max_new_tokens)}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
process_results: !function utils.vqav2_process_results_val
metadata:
  - version: 0.0
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: {json.dumps(PROMPT_SUFFIX)}
"""


def records(bench) -> list[dict]:
    """One VQAv2-shaped document per synthvqa question, in question order."""
    key = {str(r["question_id"]): r for r in bench.key}
    rows = []
    for q in bench.questions:
        text = q["text"]
        question = text[: -len(PROMPT_SUFFIX)] if text.endswith(PROMPT_SUFFIX) else text
        gold = key[q["qid"]]
        rows.append(
            {
                "question_id": q["qid"],
                "image": str(Path(bench.images) / q["image"]),
                "question": question,
                "answer": str(gold["answer"]),
                "answers": [
                    {"answer": str(gold["answer"]), "answer_id": i + 1} for i in range(ANNOTATORS)
                ],
                "category": q.get("category") or "",
                "pope": q.get("pope") or "",
            }
        )
    return rows


def export(out, limit=None, seed=0, scenes=vqa.SCENES, cache=None, task="synthvqa", max_new_tokens=16):
    """Write ``out``/data (the dataset), ``out``/<task>.yaml and ``out``/utils.py; returns the YAML path."""
    import datasets

    bench = vqa.load_bench("synthvqa", seed=seed, scenes=scenes, cache=cache, limit=limit)
    rows = records(bench)
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "answers": [{"answer": datasets.Value("string"), "answer_id": datasets.Value("int64")}],
            "category": datasets.Value("string"),
            "pope": datasets.Value("string"),
        }
    )
    columns = {name: [r[name] for r in rows] for name in features}
    ds = datasets.Dataset.from_dict(columns, features=features)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(out / "data"))
    (out / "utils.py").write_text(UTILS)
    path = out / f"{task}.yaml"
    path.write_text(task_yaml(task, out / "data", max_new_tokens))
    # `mmsink eval --bench synthvqa --limit K` (same --scenes / --seed) answers the same questions
    return path


def main(argv=None):
    p = parser("export-lmms", __doc__)
    p.add_argument("--out", required=True, help="folder for data/, <task>.yaml and utils.py")
    p.add_argument("--limit", type=int, help="only the first K questions of the test split")
    p.add_argument("--scenes", type=int, default=vqa.SCENES, help="synthvqa test scenes (3 questions each)")
    p.add_argument("--seed", type=int, default=0, help="synthvqa seed")
    p.add_argument("--cache", help="synthvqa cache root (default ~/.cache/mmsink)")
    p.add_argument("--task", default="synthvqa", help="the task's name in lmms-eval (default synthvqa)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default 16)")
    args = p.parse_args(argv)
    try:
        import datasets  # noqa: F401
    except ImportError:
        print('mmsink export-lmms: error: needs datasets (pip install -e ".[lmms]")', file=sys.stderr)
        raise SystemExit(1) from None
    path = export(args.out, args.limit, args.seed, args.scenes, args.cache, args.task, args.max_new_tokens)
    print(f"task {args.task}: {path} (lmms-eval --include_path {Path(args.out)} --tasks {args.task})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
