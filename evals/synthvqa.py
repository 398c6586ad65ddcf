"""Seeded synthetic VQA benchmark (scenes of shapes and handwritten digits).

Every scene is drawn from its own random stream, keyed by (seed, split, index), so a
scene never depends on how many scenes are generated or on the other splits, and the
three splits never share a scene. Images are rendered from the scene description
alone (the pixel noise has its own stored seed), so ``render_scene`` reproduces them.

Question categories: color, shape, count, existence (POPE-style, with a ``pope``
sub-type), spatial, digit and holistic. Answers are single lowercase words or digits.

CLI: ``python -m mmsink.evals.synthvqa --out DIR --train N --val N --test N --seed S``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
CATEGORIES = ("color", "shape", "count", "existence", "spatial", "digit", "holistic")
POPE_TYPES = ("random", "popular", "adversarial")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
# Skewed priors so that "popular" POPE negatives come from a real frequency ranking.
SHAPE_WEIGHTS = np.array([0.30, 0.25, 0.20, 0.15, 0.10])
COLOR_WEIGHTS = np.array([0.25, 0.20, 0.18, 0.15, 0.12, 0.10])
OBJECT_TYPES = tuple((c, s) for c in COLORS for s in SHAPES)

# name -> (kind, first colour, second colour). Neutral tones so every object colour stands out.
BACKGROUNDS = {
    "white": ("plain", (236, 236, 236), (236, 236, 236)),
    "gray": ("plain", (125, 125, 125), (125, 125, 125)),
    "black": ("plain", (24, 24, 24), (24, 24, 24)),
    "brown": ("plain", (105, 74, 50), (105, 74, 50)),
    "light gradient": ("gradient", (250, 250, 250), (165, 165, 170)),
    "dark gradient": ("gradient", (12, 12, 20), (95, 95, 95)),
    "warm gradient": ("gradient", (235, 222, 196), (140, 105, 80)),
}
GRADIENT_DIRECTIONS = ("vertical", "horizontal", "diagonal")
NOISE_LEVELS = (0.0, 3.0, 6.0, 9.0)
BASE = 224  # sizes below are in pixels of a 224x224 image and scale with the image


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str  # "small" or "large"
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)

    @property
    def center(self) -> tuple[int, int]:
        return ((self.bbox[0] + self.bbox[2]) // 2, (self.bbox[1] + self.bbox[3]) // 2)


@dataclass(frozen=True)
class Digit:
    value: int
    index: int  # row of sklearn.datasets.load_digits() that was drawn
    bbox: tuple[int, int, int, int]
    dark_on_light: bool


@dataclass(frozen=True)
class Background:
    name: str
    kind: str  # "plain" or "gradient"
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    direction: str


@dataclass(frozen=True)
class Scene:
    scene_id: str
    size: int
    background: Background
    objects: tuple[SceneObject, ...]
    digits: tuple[Digit, ...]
    noise_std: float
    noise_seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Scene:
        bg = d["background"]
        return Scene(
            scene_id=d["scene_id"],
            size=d["size"],
            background=Background(
                bg["name"], bg["kind"], tuple(tuple(c) for c in bg["colors"]), bg["direction"]
            ),
            objects=tuple(
                SceneObject(o["shape"], o["color"], o["size"], tuple(o["bbox"])) for o in d["objects"]
            ),
            digits=tuple(
                Digit(g["value"], g["index"], tuple(g["bbox"]), g["dark_on_light"]) for g in d["digits"]
            ),
            noise_std=d["noise_std"],
            noise_seed=d["noise_seed"],
        )


@dataclass
class SplitData:
    scenes: list[Scene]
    questions: list[dict]
    answers: list[dict]


# ----------------------------------------------------------------------------- digits


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def digit_pool(split: str) -> np.ndarray:
    """sklearn digit rows usable by a split: row % 5 in {0,1,2} train, 3 val, 4 test.

    Keeping the handwriting samples disjoint stops a model from memorising test digits.
    """
    rows = np.arange(len(_digits()[1]))
    keep = {"train": (0, 1, 2), "val": (3,), "test": (4,)}[split]
    return rows[np.isin(rows % 5, keep)]


# ----------------------------------------------------------------------------- scenes


def _overlaps(a, b, gap) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _place(rng, side, taken, size, gap, tries=150):
    """Rejection-sample a side x side box that keeps `gap` pixels from every taken box."""
    hi = size - side - gap
    for _ in range(tries):
        x0, y0 = (int(v) for v in rng.integers(gap, hi + 1, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if not any(_overlaps(box, t, gap) for t in taken):
            return box
    return None


def make_scene(rng: np.random.Generator, scene_id: str, size: int = BASE, pool=None) -> Scene:
    """Draw one scene: background, 2-6 non-overlapping shapes and 0-2 digit patches."""
    scale = size / BASE
    gap = max(2, round(4 * scale))
    name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    kind, c0, c1 = BACKGROUNDS[name]
    direction = GRADIENT_DIRECTIONS[int(rng.integers(3))] if kind == "gradient" else "none"
    background = Background(name, kind, (c0, c1), direction)

    n_objects = int(rng.integers(2, 7))
    specs = []
    for _ in range(n_objects):
        shape = SHAPES[int(rng.choice(len(SHAPES), p=SHAPE_WEIGHTS))]
        color = list(COLORS)[int(rng.choice(len(COLORS), p=COLOR_WEIGHTS))]
        large = bool(rng.random() < 0.5)
        lo, hi = (0.19, 0.26) if large else (0.09, 0.13)
        side = int(round(size * rng.uniform(lo, hi)))
        specs.append((side, shape, color, "large" if large else "small"))
    specs.sort(key=lambda s: -s[0])  # big first: fewer rejections

    taken, objects = [], []
    for side, shape, color, size_word in specs:
        box = _place(rng, side, taken, size, gap)
        if box is not None:
            taken.append(box)
            objects.append(SceneObject(shape, color, size_word, box))

    pool = digit_pool("train") if pool is None else pool
    n_digits = int(rng.choice(3, p=[0.25, 0.5, 0.25]))
    digits = []
    for _ in range(n_digits):
        side = int(round(rng.uniform(40, 56) * scale))
        row = int(pool[int(rng.integers(len(pool)))])
        dark_on_light = bool(rng.random() < 0.5)
        box = _place(rng, side, taken, size, gap)
        if box is not None:
            taken.append(box)
            digits.append(Digit(int(_digits()[1][row]), row, box, dark_on_light))

    noise_std = float(NOISE_LEVELS[int(rng.integers(len(NOISE_LEVELS)))])
    noise_seed = int(rng.integers(2**31))
    return Scene(scene_id, size, background, tuple(objects), tuple(digits), noise_std, noise_seed)


def make_scenes(split: str, n_scenes: int, seed: int, size: int = BASE) -> list[Scene]:
    """Scenes of a split; scene i uses the stream (seed, split code, i) and nothing else."""
    pool = digit_pool(split)
    code = SPLIT_CODES[split]
    return [
        make_scene(np.random.default_rng([seed, code, i]), f"{split}_{i:05d}", size, pool)
        for i in range(n_scenes)
    ]


# ----------------------------------------------------------------------------- rendering


def _background(bg: Background, size: int) -> np.ndarray:
    c0, c1 = np.array(bg.colors[0], np.float32), np.array(bg.colors[1], np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if bg.direction == "vertical":
        t = np.broadcast_to(ramp[:, None], (size, size))
    elif bg.direction == "horizontal":
        t = np.broadcast_to(ramp[None, :], (size, size))
    elif bg.direction == "diagonal":
        t = (ramp[:, None] + ramp[None, :]) / 2
    else:
        t = np.zeros((size, size), np.float32)
    return c0 + (c1 - c0) * t[..., None]


def _shape_points(obj: SceneObject):
    x0, y0, x1, y1 = obj.bbox
    w = x1 - x0
    cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
    if obj.shape == "triangle":
        return [(x0, y1 - 1), (x1 - 1, y1 - 1), (cx, y0)]
    if obj.shape == "star":
        outer, inner = (w - 1) / 2, (w - 1) / 2 * 0.45
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, outer, inner)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]
    raise ValueError(obj.shape)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    fill = COLORS[obj.color]
    x0, y0, x1, y1 = obj.bbox
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "cross":
        arm = max(2, (x1 - x0) // 3)
        mx, my = (x0 + x1) // 2 - arm // 2, (y0 + y1) // 2 - arm // 2
        draw.rectangle((mx, y0, mx + arm - 1, y1 - 1), fill=fill)
        draw.rectangle((x0, my, x1 - 1, my + arm - 1), fill=fill)
    else:
        draw.polygon(_shape_points(obj), fill=fill)


def _digit_patch(digit: Digit) -> np.ndarray:
    x0, y0, x1, y1 = digit.bbox
    side = x1 - x0
    pad = max(1, side // 10)
    ink8 = (_digits()[0][digit.index] / 16.0 * 255).astype(np.uint8)
    ink = Image.fromarray(ink8).resize((side - 2 * pad, side - 2 * pad), Image.BICUBIC)
    t = np.zeros((side, side), np.float32)
    t[pad : side - pad, pad : side - pad] = np.asarray(ink, np.float32) / 255.0
    paper, pen = (235.0, 20.0) if digit.dark_on_light else (20.0, 235.0)
    grey = paper + (pen - paper) * t
    return np.repeat(grey[..., None], 3, axis=2)


def render_scene(scene: Scene) -> Image.Image:
    """Render a scene to an RGB image; depends only on the scene (noise uses scene.noise_seed)."""
    img = Image.fromarray(_background(scene.background, scene.size).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj)
    arr = np.asarray(img, np.float32).copy()
    for digit in scene.digits:
        x0, y0, x1, y1 = digit.bbox
        arr[y0:y1, x0:x1] = _digit_patch(digit)
    if scene.noise_std > 0:
        noise = np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise_std, arr.shape)
        arr = arr + noise.astype(np.float32)
    return Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- questions


@dataclass
class _State:
    """Counters shared by all scenes of a split; they keep categories and yes/no balanced."""

    type_freq: Counter
    counts: Counter = field(default_factory=Counter)
    existence_n: int = 0
    spatial_n: int = 0
    spatial_yesno_n: int = 0


def _matches(objs, obj, keys) -> int:
    return sum(all(getattr(o, k) == getattr(obj, k) for k in keys) for o in objs)


def _phrase(obj: SceneObject, keys) -> str:
    words = [getattr(obj, k) for k in ("size", "color") if k in keys]
    return " ".join(words + [obj.shape if "shape" in keys else "object"])


def _describe(objs, obj, options):
    """The first key set in `options` that singles out obj among objs, as a phrase, or None."""
    for keys in options:
        if _matches(objs, obj, keys) == 1:
            return _phrase(obj, keys)
    return None


def _ask_color(scene, rng, state):
    objs = scene.objects
    cands = [(o, d) for o in objs if (d := _describe(objs, o, [("shape",), ("size", "shape")]))]
    if not cands:
        return None
    obj, phrase = cands[int(rng.integers(len(cands)))]
    return {"text": f"What color is the {phrase}?", "answer": obj.color}


def _ask_shape(scene, rng, state):
    objs = scene.objects
    cands = [(o, d) for o in objs if (d := _describe(objs, o, [("color",), ("size", "color")]))]
    if not cands:
        return None
    obj, phrase = cands[int(rng.integers(len(cands)))]
    return {"text": f"What shape is the {phrase}?", "answer": obj.shape}


def _pick_weighted_by_count(rng, values, counts):
    # Weight by count squared: most scenes hold one of each kind, so a uniform pick would
    # make "1" the answer most of the time.
    w = np.array([counts[v] for v in values], float) ** 2
    return values[int(rng.choice(len(values), p=w / w.sum()))]


def _ask_count(scene, rng, state):
    objs = scene.objects
    if rng.random() < 0.5:
        counts = Counter(o.shape for o in objs)
        if rng.random() < 0.1:  # sometimes an absent shape, answer "0"
            absent = [s for s in SHAPES if s not in counts]
            shape = absent[int(rng.integers(len(absent)))] if absent else None
        else:
            shape = _pick_weighted_by_count(rng, sorted(counts, key=SHAPES.index), counts)
        if shape is not None:
            return {"text": f"How many {PLURALS[shape]} are there?", "answer": str(counts[shape])}
    counts = Counter(o.color for o in objs)
    color = _pick_weighted_by_count(rng, sorted(counts, key=list(COLORS).index), counts)
    return {"text": f"How many {color} objects are there?", "answer": str(counts[color])}


def _negative(scene, rng, state, pope):
    present = {(o.color, o.shape) for o in scene.objects}
    absent = [t for t in OBJECT_TYPES if t not in present]
    if pope == "random":
        return absent[int(rng.integers(len(absent)))] if absent else None
    if pope == "popular":
        # Most frequent type of the split that is absent here; ties in fixed type order.
        return max(absent, key=lambda t: (state.type_freq[t], -OBJECT_TYPES.index(t)), default=None)
    # adversarial: shares a colour or a shape with what is present; prefer the most shared.
    shared = {t: sum(t[0] == c or t[1] == s for c, s in present) for t in absent}
    shared = {t: n for t, n in shared.items() if n > 0}
    if not shared:
        return None
    best = max(shared.values())
    top = [t for t in absent if shared.get(t) == best]
    return top[int(rng.integers(len(top)))]


def _ask_existence(scene, rng, state):
    # Fixed rotation: yes/no alternate, and each POPE sub-type gets one yes and one no in turn.
    pope = POPE_TYPES[(state.existence_n // 2) % 3]
    if state.existence_n % 2 == 0:
        present = sorted({(o.color, o.shape) for o in scene.objects}, key=OBJECT_TYPES.index)
        color, shape = present[int(rng.integers(len(present)))]
        answer = "yes"
    else:
        picked = _negative(scene, rng, state, pope)
        if picked is None:
            return None
        color, shape = picked
        answer = "no"
    article = "an" if color[0] in "aeiou" else "a"
    return {"text": f"Is there {article} {color} {shape} in the image?", "answer": answer, "pope": pope}


def _separated(a, b, axis) -> int:
    """-1 if a lies wholly before b along axis (0 = x, 1 = y), 1 if wholly after, 0 otherwise."""
    if a.bbox[axis + 2] <= b.bbox[axis]:
        return -1
    if b.bbox[axis + 2] <= a.bbox[axis]:
        return 1
    return 0


def _ask_spatial(scene, rng, state):
    objs = scene.objects
    refs = {
        i: _describe(objs, o, [("color", "shape"), ("size", "color", "shape")]) for i, o in enumerate(objs)
    }
    pairs = [
        (i, j, axis)
        for i in range(len(objs))
        for j in range(len(objs))
        if i != j and refs[i] and refs[j]
        for axis in (0, 1)
        if _separated(objs[i], objs[j], axis)
    ]
    if not pairs:
        return None
    i, j, axis = pairs[int(rng.integers(len(pairs)))]
    a, b = objs[i], objs[j]
    before = _separated(a, b, axis) < 0  # a is left of / above b
    if state.spatial_n % 2 == 0:
        want_yes = state.spatial_yesno_n % 2 == 0
        words = ("to the left of", "to the right of") if axis == 0 else ("above", "below")
        relation = words[0] if before == want_yes else words[1]
        return {
            "text": f"Is the {refs[i]} {relation} the {refs[j]}?",
            "answer": "yes" if want_yes else "no",
            "form": "yesno",
        }
    if axis == 0:
        ask_first = bool(rng.random() < 0.5)
        text = "Which is further left" if ask_first else "Which is further right"
    else:
        ask_first = bool(rng.random() < 0.5)
        text = "Which is higher" if ask_first else "Which is lower"
    winner = refs[i] if before == ask_first else refs[j]
    return {"text": f"{text}, the {refs[i]} or the {refs[j]}?", "answer": winner, "form": "which"}


def _ask_digit(scene, rng, state):
    digits = scene.digits
    if len(digits) == 1:
        return {"text": "What digit is written in the image?", "answer": str(digits[0].value)}
    if len(digits) == 2:
        a, b = digits
        for axis, names in ((0, ("left", "right")), (1, ("top", "bottom"))):
            order = _separated(a, b, axis)
            if order:
                first, second = (a, b) if order < 0 else (b, a)
                k = int(rng.integers(2))
                target = (first, second)[k]
                return {"text": f"What is the {names[k]} digit in the image?", "answer": str(target.value)}
    return None


def _ask_holistic(scene, rng, state):
    options = ["shapes", "digits"] + (["background"] if scene.background.kind == "plain" else [])
    pick = options[int(rng.integers(len(options)))]
    if pick == "background":
        return {"text": "What color is the background?", "answer": scene.background.name}
    if pick == "digits":
        return {"text": "How many handwritten digits are in the image?", "answer": str(len(scene.digits))}
    return {"text": "How many geometric shapes are in the image?", "answer": str(len(scene.objects))}


ASKERS = {
    "color": _ask_color,
    "shape": _ask_shape,
    "count": _ask_count,
    "existence": _ask_existence,
    "spatial": _ask_spatial,
    "digit": _ask_digit,
    "holistic": _ask_holistic,
}


def _questions_for_scene(scene, rng, state, split, index, per_scene):
    questions, answers, seen = [], [], set()
    for k in range(per_scene):
        used = {q["category"] for q in questions}
        # Least-asked category first (random tie-break) keeps the split balanced.
        order = sorted(CATEGORIES, key=lambda c: (c in used, state.counts[c], rng.random()))
        for cat in order:
            q = ASKERS[cat](scene, rng, state)
            if q is None or q["text"] in seen:
                continue
            seen.add(q["text"])
            state.counts[cat] += 1
            if cat == "existence":
                state.existence_n += 1
            if cat == "spatial":
                state.spatial_n += 1
                state.spatial_yesno_n += q["form"] == "yesno"
            qid = f"{split}_{index:05d}_{k}"
            rec = {
                "question_id": qid,
                "image": f"{scene.scene_id}.png",
                "text": q["text"] + PROMPT_SUFFIX,
                "category": cat,
            }
            ans = {"question_id": qid, "answer": q["answer"], "category": cat}
            if "pope" in q:
                rec["pope"] = ans["pope"] = q["pope"]
            questions.append(rec)
            answers.append(ans)
            break
    return questions, answers


def make_questions(scenes: list[Scene], split: str, seed: int, questions_per_scene: int = 3):
    """Questions and answer key for the scenes of one split (in scene order)."""
    freq = Counter(t for s in scenes for t in {(o.color, o.shape) for o in s.objects})
    state = _State(type_freq=freq)
    questions, answers = [], []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], i, 1])
        q, a = _questions_for_scene(scene, rng, state, split, i, questions_per_scene)
        questions += q
        answers += a
    return questions, answers


# ----------------------------------------------------------------------------- output


def _write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def _save_image(args) -> None:
    scene, path = args
    render_scene(scene).save(path, format="PNG", compress_level=1)


def generate(
    split: str,
    n_scenes: int,
    seed: int = 0,
    out_dir=None,
    questions_per_scene: int = 3,
    image_size: int = BASE,
    workers: int = 1,
) -> SplitData:
    """Build one split; when out_dir is given, write images and JSONL files there.

    Writes ``images/<split>_<id>.png``, ``<split>_questions.jsonl`` (LLaVA question
    format), ``<split>_answers.jsonl`` (answer key) and ``<split>_scenes.jsonl``.
    Output is identical for the same arguments, whatever `workers` is.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}")
    scenes = make_scenes(split, n_scenes, seed, image_size)
    questions, answers = make_questions(scenes, split, seed, questions_per_scene)
    if out_dir is not None:
        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        jobs = [(s, out / "images" / f"{s.scene_id}.png") for s in scenes]
        if workers > 1:
            from multiprocessing import Pool

            with Pool(workers) as pool:
                pool.map(_save_image, jobs, chunksize=32)
        else:
            for job in jobs:
                _save_image(job)
        _write_jsonl(out / f"{split}_questions.jsonl", questions)
        _write_jsonl(out / f"{split}_answers.jsonl", answers)
        _write_jsonl(out / f"{split}_scenes.jsonl", (s.to_dict() for s in scenes))
    return SplitData(scenes, questions, answers)


def load_scenes(path) -> list[Scene]:
    with open(path, encoding="utf-8") as f:
        return [Scene.from_dict(json.loads(line)) for line in f if line.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Generate the synthetic VQA benchmark.")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=0)
    p.add_argument("--val", type=int, default=0)
    p.add_argument("--test", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=BASE, help="image side in pixels")
    p.add_argument("--questions-per-scene", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    for split in ("train", "val", "test"):
        n = getattr(args, split)
        if n <= 0:
            continue
        t0 = time.perf_counter()
        data = generate(split, n, args.seed, args.out, args.questions_per_scene, args.size, args.workers)
        cats = Counter(q["category"] for q in data.questions)
        print(
            f"{split}: {n} scenes, {len(data.questions)} questions in {time.perf_counter() - t0:.1f}s "
            f"{dict(sorted(cats.items()))}"
        )


if __name__ == "__main__":
    main()
