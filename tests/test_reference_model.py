"""The shipped reference model (models/synthllava) loads offline like any checkpoint, answers unseen
test-split questions well, and falls to chance when its images are replaced by noise: it reads them."""

from collections import Counter

import numpy as np
import pytest
import torch
from mmsink.evals.eval import load_model, prompt_for
from mmsink.evals.reference_model import DEFAULT_PATH
from mmsink.evals.scorers import normalize_answer
from mmsink.evals.synthvqa import generate, render_scene
from PIL import Image

SCENES = 40  # 120 questions, every category


@pytest.fixture(scope="module")
def shipped():
    model, processor = load_model(DEFAULT_PATH)
    data = generate("test", SCENES, seed=0)
    images = {s.scene_id: render_scene(s) for s in data.scenes}
    return model, processor, data, images


def answers(model, processor, questions, images):
    texts = [prompt_for(processor, q["text"]) for q in questions]
    enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    new = out[:, enc["input_ids"].shape[1] :]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def accuracy(preds, key):
    return float(np.mean([normalize_answer(p) == normalize_answer(a["answer"]) for p, a in zip(preds, key)]))


def test_answers_unseen_questions(shipped):
    model, processor, data, images = shipped
    preds = answers(model, processor, data.questions, [images[q["image"][:-4]] for q in data.questions])
    assert accuracy(preds, data.answers) >= 0.85
    for cat in ("color", "shape", "existence", "holistic"):  # the categories it masters
        pick = [i for i, a in enumerate(data.answers) if a["category"] == cat]
        assert accuracy([preds[i] for i in pick], [data.answers[i] for i in pick]) >= 0.85, cat


def test_noise_images_fall_to_chance(shipped):
    model, processor, data, _ = shipped
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in data.questions]
    preds = answers(model, processor, data.questions, noise)
    # chance: always giving each category's most common answer (a blind model's best strategy)
    by_cat = {}
    for a in data.answers:
        by_cat.setdefault(a["category"], []).append(normalize_answer(a["answer"]))
    blind = sum(Counter(v).most_common(1)[0][1] for v in by_cat.values()) / len(data.answers)
    assert accuracy(preds, data.answers) <= blind + 0.05
