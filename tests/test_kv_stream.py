"""evals/kv_stream's scoring and table: the text column (every non-image token) beside the answer columns."""

import math

import torch

from evals.kv_stream import scores, table


def reference(logits, ids, sel):
    """Per-token loop: token t (t >= 1, sel[t]) is predicted by row t - 1."""
    nll, right, n = 0.0, 0, 0
    for t in range(1, len(ids)):
        if not sel[t]:
            continue
        row = [float(x) for x in logits[t - 1]]
        top = max(row)
        lse = top + math.log(sum(math.exp(x - top) for x in row))
        nll += lse - row[int(ids[t])]
        right += int(row.index(top) == int(ids[t]))
        n += 1
    return nll, right, n


def test_scores_match_a_per_token_loop():
    g = torch.Generator().manual_seed(0)
    T, V, image = 40, 11, 7
    logits = torch.randn(T, V, generator=g) * 3
    ids = torch.randint(0, V, (T,), generator=g)
    ids[5:15] = image
    for t in range(1, T, 3):  # some tokens right, the rest mostly wrong
        logits[t - 1, ids[t]] += 8
    for sel in (ids != image, torch.rand(T, generator=g) > 0.5, torch.zeros(T, dtype=torch.bool)):
        sel[0] = True  # the first token is never predicted: ignored
        nll, right, n = scores(logits, ids, sel)
        want = reference(logits, ids, sel)
        assert n == want[2] and right == want[1]
        assert math.isclose(nll, want[0], rel_tol=1e-5, abs_tol=1e-5)
    assert 0 < scores(logits, ids, ids != image)[1] < scores(logits, ids, ids != image)[2]


def result(meta_text: bool):
    row = {"mode": "full", "ppl_answers": 2.0, "acc_answers": 0.5, "ppl_past_context": None}
    row["acc_past_context"] = None
    new = dict(row, mode="window 8", ppl_text=3.25, acc_text=0.75)
    meta = {"tokens": 50, "image_tokens": 20, "answer_tokens": 6, "answer_tokens_past_context": 0}
    if meta_text:
        meta["text_tokens"] = 29
    args = {"model": "m", "images": 1, "questions": 2}
    return {"command": "c", "args": args, "trained_context": 64, "stream_meta": meta, "stream": [row, new]}


def test_table_text_column():
    lines = table(result(True)).splitlines()
    assert "| full | 2.000 | 0.500 | - | - | - | - |" in lines
    assert "| window 8 | 2.000 | 0.500 | - | - | 3.250 | 0.750 |" in lines
    assert any("every non-image token (29;" in x for x in lines)
    old = table(result(False))  # a file written before the column: no count to quote
    assert "every non-image token." in old and "| window 8 | 2.000 | 0.500 | - | - | 3.250 | 0.750 |" in old
