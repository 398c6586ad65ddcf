"""``mmsink eval``: answer a VQA question set with a (pruned) model, write LLaVA's answers JSONL.

    mmsink eval --model PATH --bench synthvqa --prune fastv --budget 64 --batch-size 8 --out answers.jsonl

Without --out the answers go to eval/<model>-<bench>-<method>[-<budget>].jsonl. Answers are appended and
flushed per batch, and question_ids already in the answers file are skipped, so an interrupted run
(Ctrl-C: exit status 130) is continued by running the same command again. Records that cannot be used
(malformed line, empty question, missing or unreadable image, unknown category) are reported by
question_id or line on stderr, listed again at the end and in <out>.errors.json (written only when there
are any); the rest is answered.

Data parallel: ``--num-processes N``, ``torchrun --nproc-per-node N -m mmsink eval ...`` or
``accelerate launch --num_processes N -m mmsink eval ...`` (see evals/parallel.py).

Exit code: 0 when ``--out`` holds an answer for at least one selected question (single bad records do
not fail the run), 1 when none could be answered or the model/method could not be set up, 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmsink.tools import loading
from mmsink.tools.loading import LoadError, check_out_file, fail, open_image, parser, prompt_for

from . import parallel, vqa


class EvalError(Exception):
    """A run that cannot go on: settings mmsink refuses, an answers file of other settings."""


@dataclass
class Settings:
    method: str | None = None
    budget: int | float | None = None
    options: dict = field(default_factory=dict)
    var: bool | dict = False
    sink_forward: bool | dict = False
    config: str | None = None  # a calibration file for wrap(config=...)

    def meta(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "options": self.options,
            "var": self.var,
            "sink_forward": self.sink_forward,
        }

    def label(self) -> str:
        text = self.method or "full"
        if self.budget is not None:
            text += f" budget {self.budget}"
        text += " +var" * bool(self.var) + " +sink_forward" * bool(self.sink_forward)
        return text + "".join(f" {k}={v}" for k, v in self.options.items())

    def apply(self, model):
        import mmsink

        try:
            mmsink.wrap(
                model,
                prune=self.method,
                budget=self.budget,
                var=self.var,
                sink_forward=self.sink_forward,
                config=self.config,
                **self.options,
            )
        except (ValueError, NotImplementedError, TypeError) as e:
            raise EvalError(f"cannot apply {self.label()}: {e}") from e


# ----------------------------------------------------------------------------- model


def load_model(path, device="cpu", dtype="float32"):
    """Model and processor from a local folder (``mmsink.tools.loading``), errors as EvalError."""
    try:
        return loading.load_model(path, device, dtype)
    except loading.LoadError as e:
        raise EvalError(str(e)) from None


def answer_batch(model, processor, questions, images, max_new_tokens, fast=False):
    """Greedy answers and this batch's per-sample prefill facts (kept tokens, FLOPs)."""
    import torch

    import mmsink

    texts = [prompt_for(processor, q["text"]) for q in questions]
    enc = processor(images=images, text=texts, return_tensors="pt", padding=True).to(model.device)
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        if fast:  # the same greedy tokens; static caches (and a CUDA graph on GPU)
            out = mmsink.generate_fast(model, max_new_tokens=max_new_tokens, **enc)
        else:
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
    new = out[:, enc["input_ids"].shape[1] :]
    answers = [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    s = mmsink.stats(model)  # after generate: the prefill of this batch (the first forward)
    facts = []
    for i in range(len(questions)):
        per_layer = [layer[i] for layer in s.kept_tokens]
        facts.append(
            {
                "kept_tokens": round(sum(per_layer) / len(per_layer), 3),  # mean over the decoder layers
                "kept_tokens_final": per_layer[-1],  # in the last layer: after the last pruning step
                "prefill_flops": int(s.extra["sample_prefill_flops"][i]),
                "baseline_prefill_flops": int(s.extra["sample_baseline_prefill_flops"][i]),
            }
        )
    return answers, facts


# ----------------------------------------------------------------------------- one run


def answer_id(model_id, qid, meta, text) -> str:
    # deterministic, so that the same run gives byte-identical files
    return hashlib.sha1(json.dumps([model_id, qid, meta, text]).encode()).hexdigest()[:16]


def run_eval(
    model,
    processor,
    bench: vqa.Bench,
    settings: Settings,
    out,
    batch_size=8,
    max_new_tokens=8,
    model_id="model",
    seed=0,
    progress=True,
    fast=False,
) -> dict:
    """Answer the questions of ``bench`` not yet in ``out``; return (and print) the run's summary.
    In a parallel run (evals/parallel.py) every rank answers its share and rank 0 merges and scores."""
    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    order = [q["qid"] for q in bench.questions]

    def resume():  # rank 0 alone reads (and repairs) the files before any rank appends
        done = vqa.read_answers(out) + [r for p in parallel.parts(out) for r in vqa.read_answers(p)]
        try:
            vqa.check_settings(done, model_id, settings.meta(), out)
            vqa.check_questions_match(done, bench, out)
        except ValueError as e:
            raise EvalError(str(e)) from e
        answered = {str(r["question_id"]) for r in done}
        return [qid for qid in order if qid not in answered]

    pending_ids = set(parallel.from_main(resume))
    parallel.together(lambda: settings.apply(model))
    torch.manual_seed(seed)
    if parallel.is_main():
        for p in bench.problems:
            print(vqa.describe(p), file=sys.stderr)
    pending = [q for q in bench.questions if q["qid"] in pending_ids]
    rank, ranks = parallel.rank(), parallel.size()
    mine = parallel.shard(pending, batch_size, rank, ranks)
    target = parallel.part_path(out, rank) if ranks > 1 else out
    job = (model, processor, bench, settings, model_id, max_new_tokens, fast)
    shown = progress and rank == 0
    t0 = time.perf_counter()
    found = parallel.together(lambda: append_answers(job, mine, target, batch_size, shown))
    if parallel.is_main():  # every rank's answers are in once ``together`` returns (scaling runs read this)
        print(f"answering: {time.perf_counter() - t0:.2f} s, {ranks} process(es)", file=sys.stderr)
    place = {qid: i for i, qid in enumerate(order)}
    skipped = sorted((p for ps in found for p in ps), key=lambda p: place.get(str(p["question_id"]), 0))
    problems = bench.problems + skipped

    def finish():
        parallel.merge(out, order)  # the parts of a parallel run (also leftovers of a killed one)
        errors = Path(f"{out}.errors.json")
        if problems:
            errors.write_text(json.dumps(problems, indent=1) + "\n", encoding="utf-8")
        else:  # none this time: an earlier run's list would be stale
            errors.unlink(missing_ok=True)
        wanted = set(order)
        records = [r for r in vqa.read_answers(out) if str(r["question_id"]) in wanted]
        summary = {
            "model_id": model_id,
            **settings.meta(),
            "bench": bench.name,
            "questions": len(bench.questions) + len(bench.problems),
            "answered": len(records),
            "problems": len(problems),
            **vqa.summarize(records),
        }
        scores = vqa.score(bench, records)
        if scores is not None:
            summary.update(scores)
            Path(f"{out}.score.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        report(summary, problems, settings.label())
        return summary

    return parallel.from_main(finish)


def append_answers(job, pending, out: Path, batch_size, progress) -> list[dict]:
    """Answer ``pending`` batch by batch, appending to ``out``; return the records that had to be skipped."""
    from tqdm import tqdm

    model, processor, bench, settings, model_id, max_new_tokens, fast = job
    meta = settings.meta()
    problems = []
    bar = tqdm(total=len(pending), desc=settings.label(), unit="q", file=sys.stderr, disable=not progress)
    with open(out, "a", encoding="utf-8") as f, bar:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            batch, images = [], []
            for q in chunk:
                img, error = open_image(bench.images / q["image"])
                if error:
                    problems.append(vqa.problem("image", error, q["question_id"], q["line"]))
                    tqdm.write(vqa.describe(problems[-1]), file=sys.stderr)
                else:
                    batch.append(q)
                    images.append(img)
            if batch:
                try:
                    answers, facts = answer_batch(model, processor, batch, images, max_new_tokens, fast)
                except ValueError as e:  # mmsink refuses these settings for these inputs
                    first = batch[0]["question_id"]
                    raise EvalError(
                        f"{settings.label()} failed on the batch from question_id {first}: {e}"
                    ) from e
                for q, text, fact in zip(batch, answers, facts):
                    rec = {
                        "question_id": q["question_id"],
                        "prompt": q["text"],
                        "text": text,
                        "answer_id": answer_id(model_id, q["qid"], meta, text),
                        "model_id": model_id,
                        "metadata": {**meta, **fact},
                    }
                    f.write(json.dumps(rec) + "\n")
                f.flush()  # a killed run loses at most the batch in flight
            bar.update(len(chunk))
    return problems


def report(summary: dict, problems: list[dict], label: str) -> None:
    if problems:
        print(f"{len(problems)} problem(s), not answered:", file=sys.stderr)
        for p in problems:
            print("  " + vqa.describe(p), file=sys.stderr)
    line = f"{label}: {summary['answered']} of {summary['questions']} questions answered"
    if "accuracy" in summary:
        line += f"; accuracy {summary['accuracy']:.4f} ({summary['missing']} missing, scored wrong)"
    print(line)
    for cat, acc in summary.get("per_category", {}).items():
        print(f"  {cat:<10} {acc:.4f}")
    if summary["mean_kept_tokens"] is not None:
        final = summary.get("mean_kept_tokens_final")
        print(
            f"  visual tokens kept: {summary['mean_kept_tokens']:.2f} (mean over layers)"
            + (f", {final:.2f} after the last pruning step" if final is not None else "")
            + f"; mean prefill FLOPs ratio {summary['mean_flops_ratio']:.4f}"
        )


# ----------------------------------------------------------------------------- command line


def add_common(p: argparse.ArgumentParser) -> None:
    """Arguments shared with ``mmsink sweep``."""
    p.add_argument("--model", required=True, help="local transformers checkpoint folder")
    p.add_argument("--bench", default="synthvqa", help="'synthvqa' or a LLaVA questions.jsonl")
    p.add_argument("--images", help="image folder of a questions file")
    p.add_argument("--answers", help="answer key JSONL (question_id, answer[, category]) for scoring")
    p.add_argument("--scenes", type=int, default=vqa.SCENES, help="synthvqa test scenes (3 questions each)")
    p.add_argument("--cache", help="synthvqa cache root (default ~/.cache/mmsink)")
    p.add_argument(
        "--opt",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="method options, e.g. k=3 (values as JSON); METHOD.KEY=VALUE sets one method's only",
    )
    p.add_argument(
        "--var",
        nargs="?",
        const=True,
        default=False,
        type=vqa.parse_value,
        help="VAR attention redistribution; optional JSON settings, e.g. '{\"sink_dims\": [1415, 2533]}'",
    )
    p.add_argument(
        "--sink-forward",
        nargs="?",
        const=True,
        default=False,
        type=vqa.parse_value,
        help="ViT-sink forwarding; optional JSON settings, e.g. '{\"threshold\": 100}'",
    )
    p.add_argument("--config", help="calibration file (mmsink calibrate) for wrap(config=...)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward (default 8)")
    p.add_argument("--limit", type=int, help="only the first K lines of the question set")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--dtype", default="float32", choices=loading.DTYPES, help="weights' dtype (default float32)"
    )
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit in tokens (default 8)")
    p.add_argument(
        "--fast",
        action="store_true",
        help="decode with mmsink.generate_fast (same greedy answers; CUDA graphs on GPU, not yet with VAR)",
    )
    p.add_argument("--seed", type=int, default=0, help="synthvqa seed and torch seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="answer in N local processes (data parallel; torchrun / accelerate launch set it themselves)",
    )


def default_out(model, bench, settings: Settings) -> Path:
    """eval/<model>-<bench>-<method>[-<budget>].jsonl: the same command finds the same file to resume."""
    name = Path(bench).stem if bench != "synthvqa" else "synthvqa"
    label = re.sub(r"[^A-Za-z0-9.=+_-]+", "_", settings.label().replace(" budget ", "-"))
    return Path("eval") / f"{Path(model).resolve().name}-{name}-{label}.jsonl"


def interrupted(command: str, out) -> None:
    """Ctrl-C: one line, and how to continue (answers are flushed per batch); exit status 130."""
    if parallel.is_main():
        print(
            f"\nmmsink {command}: interrupted; answers so far are in {out} (the same command continues)",
            file=sys.stderr,
        )
    raise SystemExit(130)


def setup(args, command: str):
    """Bench, model and processor from parsed arguments; exits with a message when they fail."""
    device = parallel.start(args.device)  # joins the process group of a parallel run
    try:
        with parallel.main_first():  # rank 0 generates a missing synthvqa split, the others wait
            bench = vqa.load_bench(
                args.bench, args.images, args.answers, args.seed, args.scenes, args.cache, args.limit
            )
        model, processor = load_model(args.model, device, args.dtype)
    except (ValueError, OSError, EvalError) as e:
        if parallel.is_main():
            print(f"mmsink {command}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    return bench, model, processor, vqa.weights_id(args.model)


def main(argv=None):
    p = parser("eval", __doc__)
    add_common(p)
    p.add_argument("--prune", default=None, help="method (mmsink.methods()); 'none' or omitted: no method")
    p.add_argument("--budget", default=None, help="visual tokens (64) or a fraction (0.25)")
    p.add_argument(
        "--out",
        default=None,
        help="answers JSONL (appended to, resumable; default eval/<model>-<bench>-<method>.jsonl)",
    )
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_processes < 1:
        p.error("--batch-size and --num-processes must be >= 1")
    method = None if args.prune in (None, "", "none", "full") else args.prune
    try:
        settings = Settings(
            method,
            vqa.parse_budget(args.budget),
            vqa.parse_opts(args.opt, method),
            args.var,
            args.sink_forward,
            args.config,
        )
    except ValueError as e:
        p.error(str(e))
    defaulted = args.out is None
    if defaulted:
        args.out = str(default_out(args.model, args.bench, settings))
        if argv is not None:
            argv = [*argv, "--out", args.out]  # the same file for every process of a parallel run
    try:
        check_out_file(args.out)  # before anything loads
    except LoadError as e:
        fail("eval", e)
    if args.num_processes > 1 and not parallel.launched():
        code = parallel.spawn("mmsink.evals.eval", argv, args.num_processes)
        if code:
            raise SystemExit(code)
        return 0
    try:
        bench, model, processor, model_id = setup(args, "eval")
        summary = run_eval(
            model,
            processor,
            bench,
            settings,
            args.out,
            args.batch_size,
            args.max_new_tokens,
            model_id,
            args.seed,
            not args.no_progress,
            args.fast,
        )
    except EvalError as e:
        if parallel.is_main():
            print(f"mmsink eval: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        interrupted("eval", args.out)
    if parallel.is_main() and defaulted:
        print(f"answers: {args.out}", file=sys.stderr)
    if summary["answered"] == 0:
        if parallel.is_main():
            print("mmsink eval: no question could be answered", file=sys.stderr)
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
