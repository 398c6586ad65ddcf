"""Hand-worked cases for evals.scorers, taken from the rules of the reference eval scripts."""

import json

import pytest
from mmsink.evals.scorers import (
    exact_match,
    extract_choice,
    mme_label,
    mme_scores,
    normalize_answer,
    pope_label,
    pope_metrics,
    process_digit_article,
    process_punctuation,
    score_file,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # number word -> digit, after lowercasing
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the map stops at ten
        ("a dog.", "dog"),  # article dropped, trailing period stripped
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("10,000", "10000"),  # comma between digits: marks deleted, stays one number
        ("3.5", "3.5"),  # period before a digit is kept
        ("five.", "5"),
        ("black/white", "black white"),  # '/' not touching a space becomes a space
        ("left, right", "left right"),  # ',' touching a space is deleted
        ("yes!", "yes"),
        ("dont", "don't"),  # contraction map
        ("it's red", "it's red"),  # apostrophe is not in the punctuation list
        ("  Red\n", "red"),
        ("black and white", "black and white"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_rules_separately():
    assert process_punctuation("x-ray") == "x ray"
    assert process_punctuation("x - ray") == "x  ray"  # touches a space: deleted, spaces stay
    # any digit,digit comma anywhere switches every mark to deletion
    assert process_punctuation("1,000 (approx)") == "1000 approx"
    assert process_punctuation("u.s.") == "us"
    assert process_digit_article("A Three") == "3"


def test_vqa_accuracy_ten_answers_by_hand():
    refs = ["2"] * 3 + ["3"] * 7
    # pred "two" -> "2". Leaving out one of the three "2"s leaves 2 matches -> 2/3 (3 times);
    # leaving out a "3" leaves 3 matches -> 1 (7 times). (3 * 2/3 + 7) / 10 = 0.9
    assert vqa_accuracy("two", refs) == pytest.approx(0.9)
    assert vqa_accuracy("3", refs) == pytest.approx(1.0)  # 7 matches
    assert vqa_accuracy("4", refs) == 0.0
    one = ["cat"] + ["dog"] * 9  # k=1: (1*0 + 9*1/3) / 10 = 0.3
    assert vqa_accuracy("Cat.", one) == pytest.approx(0.3)
    two = ["cat", "cat"] + ["dog"] * 8  # k=2: (2*1/3 + 8*2/3) / 10 = 0.6
    assert vqa_accuracy("a cat", two) == pytest.approx(0.6)


def test_vqa_accuracy_single_reference_is_exact_match():
    assert vqa_accuracy("The dog.", ["dog"]) == 1.0
    assert vqa_accuracy("Two", "2") == 1.0
    assert vqa_accuracy("dogs", "dog") == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_exact_match():
    assert exact_match("Four.", "4") == 1.0
    assert exact_match("Red", "red") == 1.0
    assert exact_match("red circle", "the red circle") == 1.0
    assert exact_match("dark red", "red") == 0.0


@pytest.mark.parametrize(
    "text, label",
    [
        ("Yes", "yes"),
        ("No, there is not.", "no"),
        ("There is no cat.", "no"),
        ("I do not see one", "no"),
        ("Yes. But not really.", "yes"),  # only the first sentence counts
        ("Not sure", "yes"),  # the reference rule is case-sensitive: "Not" is not a "no" word
        ("nothing", "yes"),  # whole words only
    ],
)
def test_pope_label(text, label):
    assert pope_label(text) == label


def test_pope_confusion_matrix_by_hand():
    preds = [
        "Yes",
        "No, there is not.",
        "yes",
        "There is no cat.",
        "I do not see one",
        "Yes. But not really.",
        "no",
        "Not sure",
    ]
    labels = ["yes", "no", "no", "yes", "no", "yes", "no", "no"]
    subtypes = ["random"] * 4 + ["popular"] * 4
    # parsed: yes no yes no | no yes no yes -> TP=2 (1,6) FP=2 (3,8) TN=3 (2,5,7) FN=1 (4)
    m = pope_metrics(preds, labels, subtypes)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 3, 1)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(0.5)
    rnd, pop = m["per_subtype"]["random"], m["per_subtype"]["popular"]
    assert (rnd["tp"], rnd["fp"], rnd["tn"], rnd["fn"]) == (1, 1, 1, 1)
    assert rnd["f1"] == pytest.approx(0.5)
    assert (pop["tp"], pop["fp"], pop["tn"], pop["fn"]) == (1, 1, 2, 0)
    assert pop["accuracy"] == pytest.approx(0.75)
    assert pop["recall"] == pytest.approx(1.0)
    assert pop["f1"] == pytest.approx(2 / 3)


def test_pope_no_positive_predictions():
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5


def test_mme_label():
    assert mme_label("Yes") == "yes"
    assert mme_label("Nope") == "no"
    assert mme_label("no, it is not") == "no"
    assert mme_label("Yes, there is") == "yes"
    assert mme_label("The answer is yes") == "other"  # only the first 4 characters are read


def test_mme_pairs_by_hand():
    records = [
        # existence: image a both right, image b one right -> acc 3/4, acc+ 1/2, score 125
        {"subtask": "existence", "image": "a.jpg", "prediction": "Yes", "answer": "yes"},
        {"subtask": "existence", "image": "a.jpg", "prediction": "No", "answer": "no"},
        {"subtask": "existence", "image": "b.jpg", "prediction": "yes, there is", "answer": "yes"},
        {"subtask": "existence", "image": "b.jpg", "prediction": "Yes", "answer": "no"},
        # count: image c one right -> acc 1/2, acc+ 0, score 50
        {"subtask": "count", "image": "c.jpg", "prediction": "no", "answer": "yes"},
        {"subtask": "count", "image": "c.jpg", "prediction": "not sure", "answer": "no"},
    ]
    s = mme_scores(records)
    ex, ct = s["subtasks"]["existence"], s["subtasks"]["count"]
    assert ex["acc"] == pytest.approx(0.75) and ex["acc_plus"] == pytest.approx(0.5)
    assert ex["score"] == pytest.approx(125.0)
    assert ct["acc"] == pytest.approx(0.5) and ct["acc_plus"] == 0.0 and ct["score"] == pytest.approx(50.0)
    assert s["totals"]["perception"] == pytest.approx(175.0)
    assert s["totals"]["cognition"] == 0.0


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("The answer is B", "B"),
        ("B) cat", "B"),
        ("C: a red ball", "C"),
        ("answer: (D)", "D"),
        ("The correct option is C.", "C"),
        ("I think (C) is right", "C"),
        ("b", "B"),
        ("A", "A"),
        ("A cat is on the mat", None),  # article, not option A
        ("The answer is a cat", None),
        ("", None),
        ("E", None),  # not among the offered letters
        ("B or C", None),  # two candidates: refuse to guess
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text, letters="ABCD") == letter


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_score_file_by_hand(tmp_path):
    questions = [
        {"question_id": "q1", "image": "x.png", "text": "?", "category": "color"},
        {"question_id": "q2", "image": "x.png", "text": "?", "category": "color"},
        {"question_id": "q3", "image": "x.png", "text": "?", "category": "count"},
        {"question_id": "q4", "image": "x.png", "text": "?", "category": "existence", "pope": "random"},
        {"question_id": "q5", "image": "x.png", "text": "?", "category": "existence", "pope": "random"},
        {"question_id": "q6", "image": "x.png", "text": "?", "category": "spatial"},
    ]
    key = [
        {"question_id": "q1", "answer": "red", "category": "color"},
        {"question_id": "q2", "answer": "blue", "category": "color"},
        {"question_id": "q3", "answer": "2", "category": "count"},
        {"question_id": "q4", "answer": "yes", "category": "existence", "pope": "random"},
        {"question_id": "q5", "answer": "no", "category": "existence", "pope": "random"},
        {"question_id": "q6", "answer": "red circle", "category": "spatial"},
    ]
    preds = [  # LLaVA answer-file style: the model output is in "text"; q6 has no prediction
        {"question_id": "q1", "text": "Red."},
        {"question_id": "q2", "text": "green"},
        {"question_id": "q3", "text": "Two"},
        {"question_id": "q4", "text": "Yes"},
        {"question_id": "q5", "text": "Yes"},
    ]
    r = score_file(
        _write(tmp_path / "q.jsonl", questions),
        _write(tmp_path / "p.jsonl", preds),
        _write(tmp_path / "a.jsonl", key),
    )
    assert r["n"] == 6 and r["missing"] == 1
    assert r["accuracy"] == pytest.approx(3 / 6)  # q1, q3, q4
    assert r["per_category"] == {"color": 0.5, "count": 1.0, "existence": 0.5, "spatial": 0.0}
    pope = r["pope"]
    assert (pope["tp"], pope["fp"], pope["tn"], pope["fn"]) == (1, 1, 0, 0)
    assert pope["yes_ratio"] == 1.0
    assert set(pope["per_subtype"]) == {"random"}
    # lists of records work as well as paths
    assert score_file(questions, preds, key) == r
