"""Tests for evals.synthvqa: determinism, split disjointness, answers re-derived from the scenes."""

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from mmsink.evals import synthvqa as sv
from PIL import Image
from sklearn.datasets import load_digits

SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def test_split():
    return sv.generate("test", 240, seed=7)


def _question(q):
    assert q["text"].endswith(SUFFIX)
    return q["text"][: -len(SUFFIX)]


def _find(scene, phrase):
    """Objects matching a phrase such as 'large red circle', 'blue object' or 'square'."""
    words = phrase.split()
    found = []
    for o in scene.objects:
        wanted = {"size": None, "color": None, "shape": None}
        for w in words:
            if w in ("small", "large"):
                wanted["size"] = w
            elif w in sv.COLORS:
                wanted["color"] = w
            elif w in sv.SHAPES:
                wanted["shape"] = w
            else:
                assert w == "object", phrase
        if all(v is None or getattr(o, k) == v for k, v in wanted.items()):
            found.append(o)
    return found


def _one(scene, phrase):
    found = _find(scene, phrase)
    assert len(found) == 1, f"'{phrase}' is ambiguous or missing in {scene.scene_id}"
    return found[0]


def _nearest_color(pixel):
    return min(sv.COLORS, key=lambda c: sum((int(p) - v) ** 2 for p, v in zip(pixel, sv.COLORS[c])))


def test_same_seed_gives_identical_files(tmp_path):
    a = sv.generate("val", 12, seed=3, out_dir=tmp_path / "a")
    b = sv.generate("val", 12, seed=3, out_dir=tmp_path / "b", workers=2)
    for name in ("val_questions.jsonl", "val_answers.jsonl", "val_scenes.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for scene in a.scenes:
        pa = np.asarray(Image.open(tmp_path / "a" / "images" / f"{scene.scene_id}.png"))
        pb = np.asarray(Image.open(tmp_path / "b" / "images" / f"{scene.scene_id}.png"))
        assert pa.shape == (224, 224, 3)
        assert np.array_equal(pa, pb)
    assert a.questions == b.questions and a.answers == b.answers
    c = sv.generate("val", 12, seed=4)
    assert c.questions != a.questions


def test_written_files_match_memory_and_format(tmp_path):
    data = sv.generate("train", 10, seed=1, out_dir=tmp_path)
    lines = (tmp_path / "train_questions.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == data.questions
    answers = [json.loads(x) for x in (tmp_path / "train_answers.jsonl").read_text().splitlines()]
    assert answers == data.answers
    ids = [q["question_id"] for q in data.questions]
    assert len(ids) == len(set(ids)) == 30
    for q, a in zip(data.questions, answers):
        assert q["question_id"] == a["question_id"] and q["category"] == a["category"]
        assert (tmp_path / "images" / q["image"]).is_file()
        assert a["answer"] == a["answer"].strip().lower() and len(a["answer"].split()) <= 3
        assert ("pope" in q) == (q["category"] == "existence") == ("pope" in a)
    scenes = sv.load_scenes(tmp_path / "train_scenes.jsonl")
    assert scenes == data.scenes
    first = np.asarray(Image.open(tmp_path / "images" / "train_00000.png"))
    assert np.array_equal(first, np.asarray(sv.render_scene(scenes[0])))


def test_scene_does_not_depend_on_split_length():
    assert sv.make_scenes("train", 4, seed=0) == sv.make_scenes("train", 9, seed=0)[:4]


def test_splits_never_share_a_scene():
    def signature(scene):
        d = scene.to_dict()
        d.pop("scene_id")
        return json.dumps(d, sort_keys=True)

    sigs = {split: {signature(s) for s in sv.make_scenes(split, 150, seed=0)} for split in sv.SPLIT_CODES}
    assert all(len(v) == 150 for v in sigs.values())
    assert not sigs["train"] & sigs["val"] and not sigs["train"] & sigs["test"]
    assert not sigs["val"] & sigs["test"]
    pixels = {
        split: {
            hashlib.sha1(sv.render_scene(s).tobytes()).hexdigest() for s in sv.make_scenes(split, 30, seed=0)
        }
        for split in sv.SPLIT_CODES
    }
    assert not pixels["train"] & pixels["val"] and not pixels["val"] & pixels["test"]
    # handwriting samples are split too
    rows = {split: set(sv.digit_pool(split)) for split in sv.SPLIT_CODES}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]
    for split in sv.SPLIT_CODES:
        for s in sv.make_scenes(split, 60, seed=0):
            assert all(d.index in rows[split] for d in s.digits)


def test_scene_layout(test_split):
    kinds, colors, n_digits = set(), set(), Counter()
    for s in test_split.scenes:
        assert 2 <= len(s.objects) <= 6
        boxes = [o.bbox for o in s.objects] + [d.bbox for d in s.digits]
        for i, a in enumerate(boxes):
            assert 0 <= a[0] < a[2] <= s.size and 0 <= a[1] < a[3] <= s.size
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "overlap"
        for d in s.digits:
            assert 40 <= d.bbox[2] - d.bbox[0] <= 56
        kinds |= {o.shape for o in s.objects}
        colors |= {o.color for o in s.objects}
        n_digits[len(s.digits)] += 1
    assert kinds == set(sv.SHAPES) and colors == set(sv.COLORS)
    assert set(n_digits) == {0, 1, 2}


def test_rendered_colors_at_object_centres(test_split):
    for s in test_split.scenes[:60]:
        img = np.asarray(sv.render_scene(s))
        for o in s.objects:
            x, y = o.center
            assert _nearest_color(img[y, x]) == o.color, (s.scene_id, o)


def test_image_size_is_a_parameter():
    data = sv.generate("train", 3, seed=0, image_size=160)
    assert sv.render_scene(data.scenes[0]).size == (160, 160)


def test_answers_recomputed_from_scenes(test_split):
    images, labels = load_digits().images, load_digits().target
    scenes = {f"{s.scene_id}.png": s for s in test_split.scenes}
    rendered = {}
    seen = Counter()
    for q, a in zip(test_split.questions, test_split.answers):
        scene, text, ans, cat = scenes[q["image"]], _question(q), a["answer"], q["category"]
        seen[cat] += 1
        if cat == "color":
            m = re.fullmatch(r"What color is the (.+)\?", text)
            if m:
                obj = _one(scene, m.group(1))
                assert ans == obj.color
                img = rendered.setdefault(scene.scene_id, np.asarray(sv.render_scene(scene)))
                x, y = obj.center
                assert _nearest_color(img[y, x]) == ans
        elif cat == "shape":
            m = re.fullmatch(r"What shape is the (.+)\?", text)
            assert ans == _one(scene, m.group(1)).shape
        elif cat == "count":
            m = re.fullmatch(r"How many (\w+) (objects )?are there\?", text)
            if m.group(2):
                n = sum(o.color == m.group(1) for o in scene.objects)
            else:
                shape = {v: k for k, v in sv.PLURALS.items()}[m.group(1)]
                n = sum(o.shape == shape for o in scene.objects)
            assert ans == str(n)
        elif cat == "existence":
            m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", text)
            present = any(o.color == m.group(1) and o.shape == m.group(2) for o in scene.objects)
            assert ans == ("yes" if present else "no")
            if ans == "no" and q["pope"] == "adversarial":
                assert any(o.color == m.group(1) or o.shape == m.group(2) for o in scene.objects)
        elif cat == "spatial":
            _check_spatial(scene, text, ans)
        elif cat == "digit":
            if text == "What digit is written in the image?":
                (digit,) = scene.digits
            else:
                m = re.fullmatch(r"What is the (left|right|top|bottom) digit in the image\?", text)
                axis = 0 if m.group(1) in ("left", "right") else 1
                a_, b_ = sorted(scene.digits, key=lambda d: d.bbox[axis])
                assert a_.bbox[axis + 2] <= b_.bbox[axis]  # clearly separated
                digit = a_ if m.group(1) in ("left", "top") else b_
            assert ans == str(labels[digit.index]) == str(digit.value)
            assert np.array_equal(images[digit.index], sv._digits()[0][digit.index])
        elif cat == "holistic":
            if text == "What color is the background?":
                assert scene.background.kind == "plain" and ans == scene.background.name
            elif "digits" in text:
                assert ans == str(len(scene.digits))
            else:
                assert text == "How many geometric shapes are in the image?"
                assert ans == str(len(scene.objects))
        else:
            raise AssertionError(cat)
    assert set(seen) == set(sv.CATEGORIES)


def _check_spatial(scene, text, ans):
    m = re.fullmatch(r"Is the (.+) (to the left of|to the right of|above|below) the (.+)\?", text)
    if m:
        a, b = _one(scene, m.group(1)), _one(scene, m.group(3))
        holds = {
            "to the left of": a.bbox[2] <= b.bbox[0],
            "to the right of": b.bbox[2] <= a.bbox[0],
            "above": a.bbox[3] <= b.bbox[1],
            "below": b.bbox[3] <= a.bbox[1],
        }[m.group(2)]
        opposite = {  # "no" questions must be clearly false, not merely unclear
            "to the left of": b.bbox[2] <= a.bbox[0],
            "to the right of": a.bbox[2] <= b.bbox[0],
            "above": b.bbox[3] <= a.bbox[1],
            "below": a.bbox[3] <= b.bbox[1],
        }[m.group(2)]
        assert (ans == "yes" and holds) or (ans == "no" and opposite)
        return
    m = re.fullmatch(r"Which is (further left|further right|higher|lower), the (.+) or the (.+)\?", text)
    a, b = _one(scene, m.group(2)), _one(scene, m.group(3))
    key = {
        "further left": lambda o: o.bbox[0],
        "further right": lambda o: -o.bbox[0],
        "higher": lambda o: o.bbox[1],
        "lower": lambda o: -o.bbox[1],
    }[m.group(1)]
    assert ans in (m.group(2), m.group(3))
    win, lose = (a, b) if ans == m.group(2) else (b, a)
    assert key(win) < key(lose)
    axis = 0 if "further" in m.group(1) else 1
    assert win.bbox[axis + 2] <= lose.bbox[axis] or lose.bbox[axis + 2] <= win.bbox[axis]


def test_popular_negative_is_most_frequent_absent(test_split):
    freq = Counter(t for s in test_split.scenes for t in {(o.color, o.shape) for o in s.objects})
    scenes = {f"{s.scene_id}.png": s for s in test_split.scenes}
    checked = 0
    for q, a in zip(test_split.questions, test_split.answers):
        if q.get("pope") == "popular" and a["answer"] == "no":
            m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", _question(q))
            present = {(o.color, o.shape) for o in scenes[q["image"]].objects}
            top = max(freq[t] for t in sv.OBJECT_TYPES if t not in present)
            assert freq[(m.group(1), m.group(2))] == top
            checked += 1
    assert checked > 5


def test_categories_and_yes_no_balanced(test_split):
    cats = Counter(q["category"] for q in test_split.questions)
    assert set(cats) == set(sv.CATEGORIES)
    assert max(cats.values()) - min(cats.values()) <= 1, cats
    yes_no = Counter(a["answer"] for a in test_split.answers if a["answer"] in ("yes", "no"))
    assert abs(yes_no["yes"] - yes_no["no"]) <= 2, yes_no
    for pope in sv.POPE_TYPES:
        sub = Counter(a["answer"] for a in test_split.answers if a.get("pope") == pope)
        assert abs(sub["yes"] - sub["no"]) <= 1 and sub["yes"] > 10, (pope, sub)
    for cat in ("existence", "spatial"):
        sub = Counter(
            a["answer"] for a in test_split.answers if a["category"] == cat and a["answer"] in ("yes", "no")
        )
        assert abs(sub["yes"] - sub["no"]) <= 1, (cat, sub)


def test_count_answers_not_dominated_by_one(test_split):
    counts = Counter(a["answer"] for a in test_split.answers if a["category"] == "count")
    assert counts.most_common(1)[0][1] < 0.55 * sum(counts.values()), counts
    assert {"0", "1", "2", "3"} <= set(counts)


def test_questions_are_unique_per_image(test_split):
    per_image = Counter((q["image"], q["text"]) for q in test_split.questions)
    assert max(per_image.values()) == 1


def test_cli(tmp_path, capsys):
    sv.main(["--out", str(tmp_path), "--train", "3", "--val", "2", "--test", "2", "--seed", "5"])
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        assert len((tmp_path / f"{split}_questions.jsonl").read_text().splitlines()) == 3 * n
    assert len(list((tmp_path / "images").glob("*.png"))) == 7
    assert "train: 3 scenes" in capsys.readouterr().out
