"""Answer scorers: VQAv2 accuracy and normalisation, exact match, POPE, MME, multiple choice.

Each scorer is a plain function. The rules follow the reference evaluation scripts
named in the docstrings; where those scripts have quirks that change scores, the quirk
is kept and said so.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

# --------------------------------------------------------------------------- VQA normalisation
# Data tables of the official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py).

_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll
someones someone's|somethingd something'd|somethingd've something'd've|something'dve something'd've
somethingll something'll|thats that's|thered there'd|thered've there'd've|there'dve there'd've
therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll
theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd
wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS = dict(pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", "|").split("|") if pair)
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a lookahead (not a lookbehind), so
# in effect every period that is not followed by a digit is deleted ("dog." -> "dog", "3.5" stays).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """VQA eval ``processPunctuation``.

    A punctuation mark is deleted when it touches a space somewhere in the text, or when
    the text contains a comma between two digits (then *all* listed marks are deleted, so
    "10,000" -> "10000", one number rather than "10 000"); otherwise it becomes a space
    ("black/white" -> "black white"). Periods not followed by a digit are then removed,
    at most 32 of them (the official call passes re.UNICODE, i.e. 32, as ``count``).
    """
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """VQA eval ``processDigitArticle``: lowercase, number words 'none'/'zero'..'ten' to digits,
    drop the articles a/an/the, then expand apostrophe-less contractions ("dont" -> "don't")."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Official VQA answer normalisation: newlines/tabs to spaces, strip, punctuation, digits/articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, references: list[str] | str) -> float:
    """VQAv2 accuracy: acc = min(#humans that gave the answer / 3, 1), averaged over the
    leave-one-out subsets of the references (the 10 choose 9 subsets with 10 answers),
    as in the official vqaEval.py.

    With k of 10 references matching: k * min((k-1)/3, 1) / 10 + (10-k) * min(k/3, 1) / 10,
    e.g. k=1 -> 0.3, k=2 -> 0.6, k=3 -> 0.9, k>=4 -> 1.0.
    Both prediction and references are fully normalised (the official script only
    normalises references when they disagree, since the released annotations are already
    clean). A single reference reduces to exact match after normalisation.
    """
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("need at least one reference answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(r) for r in refs]
    if len(gts) == 1:
        return float(pred == gts[0])
    total = 0.0
    for skip in range(len(gts)):
        matches = sum(g == pred for k, g in enumerate(gts) if k != skip)
        total += min(1.0, matches / 3)
    return total / len(gts)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if prediction and reference are equal after VQA normalisation, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


# --------------------------------------------------------------------------- POPE


def pope_label(text: str) -> str:
    """POPE answer rule (POPE / LLaVA eval_pope.py): keep the text before the first '.',
    remove commas, split on spaces; "no" if the words include 'No', 'no' or 'not', else "yes".
    The check is case-sensitive as in the reference ('NO' or 'Not' alone count as "yes")."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _binary_metrics(preds: list[str], labels: list[str]) -> dict:
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
    }


def pope_metrics(predictions: list[str], labels: list[str], subtypes: list[str] | None = None) -> dict:
    """POPE metrics with "yes" as the positive class: accuracy, precision, recall, F1 and
    yes-ratio (share of answers parsed as yes). Predictions are raw model answers parsed
    by :func:`pope_label`; labels are "yes"/"no". With `subtypes` (e.g. random / popular /
    adversarial per question) the result also has one block per subtype under "per_subtype".
    """
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    parsed = [pope_label(p) for p in predictions]
    gold = [g.strip().lower() for g in labels]
    result = _binary_metrics(parsed, gold)
    if subtypes is not None:
        groups = defaultdict(list)
        for p, g, s in zip(parsed, gold, subtypes):
            groups[s].append((p, g))
        result["per_subtype"] = {
            s: _binary_metrics([p for p, _ in pg], [g for _, g in pg]) for s, pg in sorted(groups.items())
        }
    return result


# --------------------------------------------------------------------------- MME

MME_GROUPS = {
    "perception": (
        "existence",
        "count",
        "position",
        "color",
        "posters",
        "celebrity",
        "scene",
        "landmark",
        "artwork",
        "OCR",
    ),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}


def mme_label(text: str) -> str:
    """MME answer rule (eval_tool/calculation.py): lowercase; exactly "yes"/"no" stays, else
    "yes" if "yes" occurs in the first 4 characters, else "no" if "no" does, else "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: list[dict]) -> dict:
    """MME per-subtask acc, acc+ and score, plus group totals.

    Each record has 'subtask', 'image', 'prediction' (raw text) and 'answer' ("yes"/"no").
    acc = right questions / questions; acc+ = images whose questions (two per image in MME)
    are all right / images; score = (acc + acc+) * 100, at most 200 per subtask. Group
    totals ("perception", "cognition") sum the scores of the subtasks present.
    """
    by_task = defaultdict(lambda: defaultdict(list))
    for r in records:
        right = mme_label(r["prediction"]) == r["answer"].strip().lower()
        by_task[r["subtask"]][r["image"]].append(right)
    tasks = {}
    for task, images in sorted(by_task.items()):
        flags = [ok for per_image in images.values() for ok in per_image]
        acc = sum(flags) / len(flags)
        acc_plus = sum(all(v) for v in images.values()) / len(images)
        tasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}
    totals = {g: sum(tasks[t]["score"] for t in names if t in tasks) for g, names in MME_GROUPS.items()}
    return {"subtasks": tasks, "totals": totals}


# --------------------------------------------------------------------------- multiple choice

_MC_START = re.compile(r"^\s*[(\[]?([A-Z])(?:[)\].:,]|\s*$)")
# Only the cue words ignore case: "the answer is a cat" must not give option A.
_MC_STATED = re.compile(r"(?i:answer|option|choice)\s*(?:is|:)?\s*[(\[]?([A-Z])(?![A-Za-z'])")
_MC_LONE = re.compile(r"^[(\[]?([a-z])[)\].]?$")
_MC_PAREN = re.compile(r"\(([A-Z])\)")
_MC_TOKEN = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")


def extract_choice(text: str, letters: str = "ABCDEFGH") -> str | None:
    """Letter of a multiple-choice answer, or None.

    Tried in order: a bare letter, lowercase too ("b", "(b)"); a capital letter opening
    the answer and closed by ')', ']', '.', ':', ',' or the end ("B", "(B)", "B.", "B) cat");
    "answer is B" / "answer: (B)" / "option B"; a parenthesised letter anywhere; finally one
    distinct standalone capital letter among `letters` (a sentence-opening "A" followed by
    a word is not taken as option A). Only letters in `letters` are returned.
    """
    text = text.strip()
    lone = _MC_LONE.match(text)  # a bare lowercase letter such as "b" or "(b)"
    if lone and lone.group(1).upper() in letters:
        return lone.group(1).upper()
    for pattern in (_MC_START, _MC_STATED, _MC_PAREN):
        m = pattern.search(text)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    found = set()
    for m in _MC_TOKEN.finditer(text):
        letter = m.group(1)
        article = letter == "A" and re.match(r"\s+[a-z]", text[m.end() :])
        if letter in letters and not article:
            found.add(letter)
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------- files


def load_jsonl(source) -> list[dict]:
    """Records from a JSONL path, or the list itself when given a list of dicts."""
    if isinstance(source, list):
        return source
    with open(Path(source), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _prediction_text(rec: dict) -> str:
    # LLaVA answer files keep the model output in "text"; accept "answer" too.
    return str(rec.get("text", rec.get("answer", "")))


def score_file(questions_jsonl, predictions_jsonl, answer_key_jsonl) -> dict:
    """Score predictions for a synthvqa split.

    Exact match after VQA normalisation per question; returns overall accuracy, accuracy
    per category, the number of questions without a prediction (scored wrong) and, for
    the 'existence' category, POPE metrics per POPE subtype.
    """
    questions = load_jsonl(questions_jsonl)
    preds = {str(r["question_id"]): _prediction_text(r) for r in load_jsonl(predictions_jsonl)}
    key = {str(r["question_id"]): r for r in load_jsonl(answer_key_jsonl)}
    per_cat = defaultdict(list)
    pope_preds, pope_gold, pope_types = [], [], []
    missing = 0
    for q in questions:
        qid = str(q["question_id"])
        gold = key[qid]
        category = q.get("category", gold.get("category", "all"))
        if qid not in preds:
            missing += 1
        pred = preds.get(qid, "")
        per_cat[category].append(exact_match(pred, gold["answer"]))
        if category == "existence":
            pope_preds.append(pred)
            pope_gold.append(gold["answer"])
            pope_types.append(q.get("pope", gold.get("pope", "all")))
    flat = [v for vs in per_cat.values() for v in vs]
    result = {
        "n": len(flat),
        "missing": missing,
        "accuracy": sum(flat) / len(flat) if flat else 0.0,
        "per_category": {c: sum(v) / len(v) for c, v in sorted(per_cat.items())},
    }
    if pope_preds:
        result["pope"] = pope_metrics(pope_preds, pope_gold, pope_types)
    return result
