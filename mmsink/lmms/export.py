"""``mmsink export-lmms``: synthvqa as ``datasets`` datasets on disk plus lmms-eval tasks that read them.

    mmsink export-lmms --out DIR [--limit 300] [--pope 120] [--mme 60] [--scenes 700] [--seed 0]
    lmms-eval --model mmsink --model_args pretrained=PATH,prune=fastv,budget=64 --include_path DIR \\
        --tasks synthvqa,synthvqa_pope,synthvqa_mme --log_samples --output_path runs/
    mmsink eval --model PATH --bench DIR/mmsink/questions.jsonl --images DIR/images \\
        --answers DIR/mmsink/answers.jsonl      # the same questions, answered by mmsink eval

Three tasks (``--task`` names them; each a ``load_from_disk`` dataset under DIR/data with one split,
``validation``), in the formats of lmms-eval's own tasks, whose prompt and scoring functions DIR/utils.py
imports:

- ``synthvqa``: the first ``--limit`` questions in ``vqav2_val``'s format (VQAv2 accuracy);
- ``synthvqa_pope``: the first ``--pope`` existence questions (yes / no) in ``pope``'s (accuracy,
  precision, recall, F1, yes ratio; ``category`` is the POPE split the negative came from);
- ``synthvqa_mme``: for each of the first ``--mme`` scenes, an existence and a count pair (one yes, one
  no each) in ``mme``'s (question_id = the image, so that MME's acc+ pairs them; perception score).

The prompt is synthvqa's own: the question plus "Answer the question using a single word or phrase."
(the tasks' post_prompt); answers are up to ``--max-new-tokens`` tokens in all three (default 16, as
vqav2 and mme; lmms-eval's pope allows 128). DIR/mmsink holds the same questions as a questions file and
answer key for ``mmsink eval`` (ids: ``mmsink_id`` in the datasets). Needs ``datasets`` (``[lmms]``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from mmsink.evals import vqa
from mmsink.evals.synthvqa import PROMPT_SUFFIX, load_scenes
from mmsink.lmms import docs as make
from mmsink.tools.loading import parser

UTILS = '''"""lmms-eval's own VQAv2, POPE and MME functions (written by ``mmsink export-lmms``)."""

from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_doc_to_text, mme_doc_to_visual  # noqa: F401
from lmms_eval.tasks.mme.utils import mme_process_results  # noqa: F401
from lmms_eval.tasks.pope.utils import pope_aggregate_accuracy, pope_aggregate_f1_score  # noqa: F401
from lmms_eval.tasks.pope.utils import pope_aggregate_precision, pope_aggregate_recall  # noqa: F401
from lmms_eval.tasks.pope.utils import pope_aggregate_yes_ratio, pope_doc_to_text  # noqa: F401
from lmms_eval.tasks.pope.utils import pope_doc_to_visual, pope_process_results  # noqa: F401
from lmms_eval.tasks.vqav2.utils import vqav2_doc_to_text, vqav2_doc_to_visual  # noqa: F401
from lmms_eval.tasks.vqav2.utils import vqav2_process_results_val  # noqa: F401
'''


def format_lines(name: str, process: str, metrics: list[tuple[str, str]]) -> str:
    """The YAML lines of one of lmms-eval's task formats: its functions and metrics (name, aggregation)."""
    lines = [f"doc_to_visual: !function utils.{name}_doc_to_visual"]
    lines += [
        f"doc_to_text: !function utils.{name}_doc_to_text",
        f"process_results: !function utils.{process}",
    ]
    lines.append("metric_list:")
    for metric, aggregation in metrics:
        lines += [f"  - metric: {metric}", f"    aggregation: {aggregation}", "    higher_is_better: true"]
        if aggregation == "mean":  # vqav2_val's exact_match
            lines += ["    ignore_case: true", "    ignore_punctuation: true"]
    return "\n".join(lines) + "\n"


POPE_METRICS = ("accuracy", "precision", "recall", "f1_score", "yes_ratio")
# each format's lines of lmms-eval's own task YAML (vqav2_val, pope, mme), inlined
FORMATS = {
    "vqav2": format_lines("vqav2", "vqav2_process_results_val", [("exact_match", "mean")]),
    "pope": format_lines(
        "pope",
        "pope_process_results",
        [(f"pope_{m}", f"!function utils.pope_aggregate_{m}") for m in POPE_METRICS],
    ),
    "mme": format_lines(
        "mme",
        "mme_process_results",
        [(f"mme_{m}_score", "!function utils.mme_aggregate_results") for m in ("perception", "cognition")],
    ),
}


def task_yaml(task: str, fmt: str, data: Path, max_new_tokens: int) -> str:
    """lmms-eval's ``fmt`` task reading the dataset saved at ``data``."""
    return f"""task: {task}
dataset_path: {json.dumps(str(data.resolve()))}
dataset_kwargs:
  load_from_disk: true
test_split: validation
output_type: generate_until
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: {int(max_new_tokens)}
{FORMATS[fmt]}metadata:
  - version: 0.0
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: {json.dumps(PROMPT_SUFFIX)}
"""


def save(rows: list[dict], images: Path, path: Path) -> None:
    """``rows`` as a DatasetDict with one split, images read from ``images``."""
    import datasets

    if not rows:
        raise ValueError(f"mmsink export-lmms: no questions for {path.name} (more --scenes?)")
    features = {name: datasets.Value("string") for name in rows[0]}
    features["image"] = datasets.Image()
    if "answers" in rows[0]:
        features["answers"] = [{"answer": datasets.Value("string"), "answer_id": datasets.Value("int64")}]
    columns = {name: [r[name] for r in rows] for name in features}
    columns["image"] = [str(images / name) for name in columns["image"]]
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(path))


def write_mmsink_bench(out: Path, tasks: dict[str, list[dict]], source: Path) -> None:
    """Every exported question once, as ``mmsink eval``'s questions file and answer key, with the images."""
    seen, questions, key = set(), [], []
    for rows in tasks.values():
        for r in rows:
            if r["mmsink_id"] in seen:
                continue
            seen.add(r["mmsink_id"])
            q = {"question_id": r["mmsink_id"], "image": r["image"], "text": r["question"] + PROMPT_SUFFIX}
            questions.append({**q, "category": r["category"]})
            key.append({"question_id": r["mmsink_id"], "answer": r["answer"], "category": r["category"]})
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name in sorted({q["image"] for q in questions}):
        shutil.copyfile(source / name, out / "images" / name)
    (out / "mmsink").mkdir(exist_ok=True)
    for name, records in (("questions", questions), ("answers", key)):
        text = "".join(json.dumps(r) + "\n" for r in records)
        (out / "mmsink" / f"{name}.jsonl").write_text(text, encoding="utf-8")


def export(
    out,
    limit=None,
    seed=0,
    scenes=vqa.SCENES,
    cache=None,
    task="synthvqa",
    max_new_tokens=16,
    pope=None,
    mme=None,
) -> dict[str, list[str]]:
    """Write the three tasks into ``out``; returns each task's ``mmsink_id`` in document order."""
    full = vqa.load_bench("synthvqa", seed=seed, scenes=scenes, cache=cache)
    key = {str(r["question_id"]): r for r in full.key}
    folder = vqa.synthvqa_dir(seed, scenes, cache)
    tasks = {
        (task, "vqav2"): make.vqav2_docs(full.questions[:limit], key),
        (f"{task}_pope", "pope"): make.pope_docs(full.questions, key)[:pope],
        (f"{task}_mme", "mme"): make.mme_docs(load_scenes(folder / "test_scenes.jsonl")[:mme]),
    }
    out = Path(out)
    write_mmsink_bench(out, {name: rows for (name, _), rows in tasks.items()}, Path(full.images))
    for (name, fmt), rows in tasks.items():
        save(rows, out / "images", out / "data" / name)
        (out / f"{name}.yaml").write_text(task_yaml(name, fmt, out / "data" / name, max_new_tokens))
    (out / "utils.py").write_text(UTILS)
    return {name: [r["mmsink_id"] for r in rows] for (name, _), rows in tasks.items()}


def main(argv=None):
    p = parser("export-lmms", __doc__)
    p.add_argument("--out", required=True, help="folder for the tasks, data/, images/ and mmsink/")
    p.add_argument("--limit", type=int, help="the VQA task: the first K questions of the test split")
    p.add_argument("--pope", type=int, help="the POPE task: the first K existence questions (default all)")
    p.add_argument("--mme", type=int, help="the MME task: the first K scenes, 4 questions each (default all)")
    p.add_argument("--scenes", type=int, default=vqa.SCENES, help="synthvqa test scenes (3 questions each)")
    p.add_argument("--seed", type=int, default=0, help="synthvqa seed")
    p.add_argument("--cache", help="synthvqa cache root (default ~/.cache/mmsink)")
    p.add_argument(
        "--task", default="synthvqa", help="the tasks' name prefix in lmms-eval (default synthvqa)"
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default 16)")
    args = p.parse_args(argv)
    for name in ("limit", "pope", "mme"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    try:
        import datasets  # noqa: F401
    except ImportError:
        print('mmsink export-lmms: error: needs datasets (pip install -e ".[lmms]")', file=sys.stderr)
        raise SystemExit(1) from None
    ids = export(
        args.out,
        args.limit,
        args.seed,
        args.scenes,
        args.cache,
        args.task,
        args.max_new_tokens,
        args.pope,
        args.mme,
    )
    for name, rows in ids.items():
        print(f"task {name}: {len(rows)} questions")
    print(f"lmms-eval --include_path {args.out} --tasks {','.join(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
