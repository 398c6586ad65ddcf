"""The exported documents: synthvqa questions in the fields of lmms-eval's VQAv2, POPE and MME tasks.

Each document also carries ``mmsink_id``, the question's id in the questions file that ``mmsink eval``
answers (``export.py`` writes it), so that a logged lmms-eval sample and an ``mmsink eval`` answer can be
matched one to one.
"""

from __future__ import annotations

from collections import Counter

from mmsink.evals.synthvqa import OBJECT_TYPES, PLURALS, PROMPT_SUFFIX, SHAPES

ANNOTATORS = 10  # VQAv2's answers per question


def bare(text: str) -> str:
    """The question without synthvqa's answer-format suffix (lmms-eval's post_prompt adds it back)."""
    return text[: -len(PROMPT_SUFFIX)] if text.endswith(PROMPT_SUFFIX) else text


def vqav2_docs(questions, key) -> list[dict]:
    """VQAv2's fields; ``answers`` is the answer ten times, as ten agreeing annotators would give it, so
    that VQAv2's leave-one-out accuracy is 1 for a match and 0 otherwise (mmsink's exact match)."""
    docs = []
    for q in questions:
        gold = str(key[q["qid"]]["answer"])
        docs.append(
            {
                "mmsink_id": q["qid"],
                "question_id": q["qid"],
                "image": q["image"],
                "question": bare(q["text"]),
                "answer": gold,
                "answers": [{"answer": gold, "answer_id": i + 1} for i in range(ANNOTATORS)],
                "category": q.get("category") or "",
            }
        )
    return docs


def pope_docs(questions, key) -> list[dict]:
    """POPE's fields for synthvqa's existence questions (yes / no); ``category`` is the POPE split
    (random, popular, adversarial) the negative was drawn by, as in POPE's own dataset."""
    docs = []
    for q in questions:
        if q.get("category") != "existence":
            continue
        docs.append(
            {
                "mmsink_id": q["qid"],
                "question_id": q["qid"],
                "image": q["image"],
                "question": bare(q["text"]),
                "answer": str(key[q["qid"]]["answer"]),
                "category": q.get("pope") or "",
            }
        )
    return docs


def existence_pair(scene) -> list[tuple[str, str]]:
    """A present object type (yes) and an absent one sharing its colour or shape where one exists (no)."""
    present = sorted({(o.color, o.shape) for o in scene.objects}, key=OBJECT_TYPES.index)
    color, shape = present[0]
    absent = [t for t in OBJECT_TYPES if t not in present]
    near = [t for t in absent if t[0] == color or t[1] == shape]
    other = (near or absent)[0]

    def ask(c, s):
        return f"Is there {'an' if c[0] in 'aeiou' else 'a'} {c} {s} in the image?"

    return [(ask(color, shape), "yes"), (ask(*other), "no")]


def count_pair(scene) -> list[tuple[str, str]]:
    """The number of objects of the most frequent shape (yes) and one more (no)."""
    counts = Counter(o.shape for o in scene.objects)
    shape = max(sorted(counts, key=SHAPES.index), key=lambda s: counts[s])
    n = counts[shape]

    def ask(k):
        return (
            f"Is there exactly one {shape} in the image?"
            if k == 1
            else (f"Are there exactly {k} {PLURALS[shape]} in the image?")
        )

    return [(ask(n), "yes"), (ask(n + 1), "no")]


MME_PAIRS = {"existence": existence_pair, "count": count_pair}  # MME perception subtasks


def mme_docs(scenes) -> list[dict]:
    """MME's fields: two questions per image and subtask (one yes, one no) sharing ``question_id`` (the
    image's name, as in MME), which MME's acc+ pairs up."""
    docs = []
    for scene in scenes:
        if not scene.objects:
            continue
        image = f"{scene.scene_id}.png"
        for category, make in MME_PAIRS.items():
            for question, answer in make(scene):
                docs.append(
                    {
                        "mmsink_id": f"mme_{scene.scene_id}_{category}_{answer}",
                        "question_id": image,
                        "image": image,
                        "question": question,
                        "answer": answer,
                        "category": category,
                    }
                )
    return docs
