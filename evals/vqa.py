"""Shared pieces of ``mmsink eval`` and ``mmsink sweep``: argument parsing, the question set (synthvqa or
a LLaVA questions file), the answers file (resume, settings check) and the summary of a run."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

SCENES = 700  # 3 questions per scene: 2100 test questions, enough for per-category accuracy


# ----------------------------------------------------------------------------- arguments


def parse_budget(text):
    """'64' -> 64 (tokens), '0.25' -> 0.25 (fraction), 'none' / '' / None -> None (method default)."""
    if text is None or str(text).strip().lower() in ("", "none", "adaptive"):
        return None
    from mmsink.pruners.base import check_budget

    text = str(text).strip()
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"budget {text}: must be an int (tokens) or a float (fraction)") from None
    try:  # mmsink's own rule, before any model loads
        return check_budget(value)
    except ValueError as e:
        raise ValueError(f"budget {text}: {str(e).removeprefix('mmsink: ')}") from None


def parse_value(text: str):
    """An option value from the command line: JSON when it parses (1, 0.5, true, null, [1,2]), else text."""
    for value in (text, text.lower()):
        try:
            return json.loads(value)
        except ValueError:
            continue
    return text


def parse_opts(items, method=None) -> dict:
    """``key=value`` items for every method, ``method.key=value`` items only for that method."""
    opts = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--opt takes key=value (or method.key=value), got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if "." in key:
            owner, key = key.split(".", 1)
            if owner != method:
                continue
        opts[key] = parse_value(value.strip())
    return opts


# ----------------------------------------------------------------------------- questions


@dataclass
class Bench:
    name: str
    questions: list[dict]  # valid records in file order
    images: Path
    key: list[dict] | None  # answer key records, when there is one
    problems: list[dict] = field(default_factory=list)  # records that could not be used


def synthvqa_dir(seed: int, scenes: int, cache=None) -> Path:
    """The cached test split; generated once (into a temporary folder, so a killed run leaves no half)."""
    from . import synthvqa

    root = Path(cache) if cache else Path.home() / ".cache" / "mmsink"
    out = root / f"synthvqa-{seed}-{scenes}"
    if (out / "test_questions.jsonl").exists() and (out / "test_answers.jsonl").exists():
        return out
    tmp = root / f".synthvqa-{seed}-{scenes}.{os.getpid()}"
    print(f"generating synthvqa test split ({scenes} scenes, seed {seed}) into {out}", file=sys.stderr)
    synthvqa.generate("test", scenes, seed, out_dir=tmp)
    if out.exists():  # an incomplete earlier attempt
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def read_jsonl(path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, record or None, problem or None) for every non-empty line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                rows.append((n, None, f"malformed JSON ({e})"))
                continue
            if not isinstance(rec, dict):
                rows.append((n, None, "not a JSON object"))
                continue
            rows.append((n, rec, None))
    return rows


def problem(where: str, message: str, question_id=None, line=None) -> dict:
    return {"question_id": question_id, "line": line, "where": where, "error": message}


def describe(p: dict) -> str:
    if p.get("question_id") is not None:
        at = f"question_id {p['question_id']}" + (f" (line {p['line']})" if p.get("line") else "")
    else:
        at = f"line {p['line']}"
    return f"{p['where']}: {at}: {p['error']}"


def check_questions(rows, where, limit=None, key=None, categories=None):
    """Valid questions and problems among the first ``limit`` lines of a questions file."""
    if limit is not None:
        rows = rows[:limit]
    questions, problems, first = [], [], {}
    for n, rec, error in rows:
        if error:
            problems.append(problem(where, error, line=n))
            continue
        qid = rec.get("question_id")
        if qid is None or str(qid).strip() == "":
            problems.append(problem(where, "no question_id", line=n))
            continue
        qid = str(qid)
        text = rec.get("text")
        cat = rec.get("category")
        if qid in first:
            error = f"duplicate question_id (first on line {first[qid]})"
        elif not isinstance(text, str) or not text.strip():
            error = "empty question text"
        elif not isinstance(rec.get("image"), str) or not rec["image"].strip():
            error = "no image file name"
        elif key is not None and qid not in key:
            error = "no answer in the answer key"
        elif categories is not None and cat is not None and cat not in categories:
            error = f"unknown category {cat!r} (known: {', '.join(sorted(categories))})"
        if qid not in first:
            first[qid] = n
        if error:
            problems.append(problem(where, error, qid, n))
            continue
        questions.append({**rec, "qid": qid, "line": n})  # qid: the id as text, for matching
    return questions, problems


def load_key(path):
    rows = read_jsonl(path)
    bad = [n for n, rec, err in rows if err or "question_id" not in rec or "answer" not in rec]
    if bad:
        raise ValueError(f"answer key {path}: unusable line(s) {bad[:10]} (need question_id and answer)")
    return [rec for _, rec, _ in rows]


def load_bench(bench, images=None, answers=None, seed=0, scenes=SCENES, cache=None, limit=None) -> Bench:
    """The questions to answer (the first ``limit`` lines), their image folder and answer key."""
    if bench == "synthvqa":
        from .synthvqa import CATEGORIES

        folder = synthvqa_dir(seed, scenes, cache)
        name = f"synthvqa-{seed}-{scenes}"
        qpath, images = folder / "test_questions.jsonl", Path(images or folder / "images")
        answers = answers or folder / "test_answers.jsonl"
        categories = set(CATEGORIES)
    else:
        qpath = Path(bench)
        if not qpath.exists():
            raise ValueError(f"no questions file at {qpath} (give --bench synthvqa or a questions.jsonl)")
        if images is None:
            raise ValueError(
                "a questions file needs --images DIR (the folder its image names are relative to)"
            )
        images, categories, name = Path(images), None, str(qpath.resolve())
    key = load_key(answers) if answers else None
    if key is not None and categories is None:
        found = {r["category"] for r in key if r.get("category")}
        categories = found or None
    by_id = {str(r["question_id"]): r for r in key} if key is not None else None
    questions, problems = check_questions(read_jsonl(qpath), qpath.name, limit, by_id, categories)
    return Bench(name, questions, images, key, problems)


# ----------------------------------------------------------------------------- the answers file


def read_answers(path: Path) -> list[dict]:
    """Records already in the answers file. A torn last line (a killed run) is dropped and the file is
    rewritten without it, so that appending continues cleanly."""
    if not path.exists():
        return []
    raw = path.read_bytes().decode("utf-8", errors="replace")
    done, dropped = [], 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(rec, dict) and "question_id" in rec and "text" in rec:
            done.append(rec)
        else:
            dropped += 1
    clean = "".join(json.dumps(r) + "\n" for r in done)
    if clean != raw:
        if dropped:
            print(f"{path}: dropped {dropped} incomplete line(s) from an interrupted run", file=sys.stderr)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(clean, encoding="utf-8")
        tmp.replace(path)
    return done


SETTING_KEYS = ("method", "budget", "options", "var", "sink_forward")


def weights_id(model: str | Path) -> str:
    """``name@hash`` of a local checkpoint: its folder name and a digest of each weight file's name, size and
    first and last MiB, so that answers of retrained weights saved under the same name are not resumed
    (hashing whole 7B checkpoints would cost a minute per run)."""
    path = Path(model).resolve()
    files = sorted(f for f in path.glob("*") if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if not files:
        return path.name
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(size - (1 << 20), 0))
            h.update(fh.read(1 << 20))
    return f"{path.name}@{h.hexdigest()[:12]}"


def check_settings(done: list[dict], model_id: str, meta: dict, path: Path) -> None:
    """Refuse to mix answers of different settings in one file (a resume with other flags)."""
    mine = json.loads(json.dumps({k: meta[k] for k in SETTING_KEYS}))  # as it reads back from JSON
    for rec in done:
        theirs = rec.get("metadata", {})
        diff = [k for k in SETTING_KEYS if theirs.get(k) != mine[k]]
        if rec.get("model_id") != model_id:
            diff.insert(0, "model_id")
        if diff:
            raise ValueError(
                f"{path} holds answers of other settings ({', '.join(diff)} differ, e.g. question_id "
                f"{rec.get('question_id')}); give another --out or delete the file"
            )


def check_questions_match(done: list[dict], bench: Bench, path: Path) -> None:
    """Refuse to resume from answers to other questions under the same ids (e.g. another synthvqa seed)."""
    text = {q["qid"]: q["text"] for q in bench.questions}
    for rec in done:
        qid = str(rec["question_id"])
        if qid in text and rec.get("prompt") != text[qid]:
            raise ValueError(
                f"{path} answers another question under question_id {qid} ({rec.get('prompt')!r}); "
                "give another --out or delete the file"
            )


# ----------------------------------------------------------------------------- summary


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None  # None, not NaN: stays valid JSON


def summarize(records: list[dict]) -> dict:
    """Visual tokens kept (mean over layers, and in the last layer: after the last pruning step) and the
    prefill FLOPs ratio (pruned / unpruned), each a mean over questions."""
    meta = [r.get("metadata", {}) for r in records]
    return {
        "mean_kept_tokens": mean(m["kept_tokens"] for m in meta if "kept_tokens" in m),
        "mean_kept_tokens_final": mean(m["kept_tokens_final"] for m in meta if "kept_tokens_final" in m),
        "mean_flops_ratio": mean(
            m["prefill_flops"] / m["baseline_prefill_flops"] for m in meta if m.get("baseline_prefill_flops")
        ),
    }


def score(bench: Bench, records: list[dict]) -> dict | None:
    """Accuracy over the selected questions (unanswered ones count as wrong and as 'missing')."""
    if bench.key is None:
        return None
    from .scorers import score_file

    wanted = {q["qid"] for q in bench.questions}
    preds = [r for r in records if str(r["question_id"]) in wanted]
    return score_file(bench.questions, preds, bench.key)
