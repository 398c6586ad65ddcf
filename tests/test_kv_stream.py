"""evals/kv_stream's scoring and table (the text column beside the answer columns), and the exact-attention
comparison that kv_stream's Recall and lfps_sink's SinkTrace share."""

import math

import torch

from evals.kv_stream import Recall, exact_step, scores, table
from evals.lfps_sink import SinkTrace


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


def trace_entry(seed=0, hq=4, hkv=2, t=12, d=8, k=5):
    """A one-sample LFPS trace entry (layer 3): GQA keys, chosen slots with repeats and a -1 (none)."""
    g = torch.Generator().manual_seed(seed)
    q, keys = torch.randn(1, hq, d, generator=g), torch.randn(1, hkv, t, d, generator=g)
    slots = torch.randint(0, t, (1, hq, k), generator=g)
    slots[0, 0, 1], slots[0, 1, :2] = -1, 0  # an empty entry, slot 0 chosen (twice) by head 1
    return 3, q, keys, slots


def loop_step(entry, topk, scaling):
    """Per head, plain Python: dense softmax weights, the exact top-k set by score, LFPS's chosen set."""
    _, q, keys, slots = entry
    hq, hkv, t = q.shape[1], keys.shape[1], keys.shape[2]
    out = []
    for h in range(hq):
        kh = keys[0, h // (hq // hkv)].tolist()
        s = [scaling * sum(a * b for a, b in zip(q[0, h].tolist(), kh[j])) for j in range(t)]
        z = sum(math.exp(x - max(s)) for x in s)
        p = [math.exp(x - max(s)) / z for x in s]
        exact = set(sorted(range(t), key=lambda j: -s[j])[:topk])
        out.append((p, exact, {int(x) for x in slots[0, h] if x >= 0}))
    return out


def test_exact_step_matches_a_per_head_loop():
    entry, topk, scaling = trace_entry(), 4, 0.4
    p, exact, chosen = exact_step(entry, topk, scaling)
    want = loop_step(entry, topk, scaling)
    assert p.shape == chosen.shape == (4, 12) and exact.shape == (4, topk)
    for h, (wp, we, wc) in enumerate(want):
        torch.testing.assert_close(p[h], torch.tensor(wp), rtol=1e-5, atol=1e-6)
        assert set(exact[h].tolist()) == we
        assert set(chosen[h].nonzero()[:, 0].tolist()) == wc
    assert any(we != wc for _, we, wc in want)  # the entry has misses to count
    assert (
        exact_step((3, entry[1], entry[2][:, :, :topk], entry[3]), topk, scaling) is None
    )  # no sparse choice


def test_recall_and_sink_trace_read_the_shared_step():
    entry, topk, scaling = trace_entry(1), 4, 0.4
    want = loop_step(entry, topk, scaling)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    recall = Recall(topk, scaling, context=10, answer=torch.arange(13) == 12)  # t = 12 keys predict token 12
    recall.append(entry)
    got = recall.summary()
    assert set(got) == {"past_context", "answers"}
    for part in got.values():
        (row,) = part
        assert row["layer"] == 3 and row["steps"] == 1
        assert math.isclose(row["recall"], mean([len(we & wc) / topk for _, we, wc in want]), rel_tol=1e-6)
        assert math.isclose(
            row["mass_lfps"], mean([sum(p[j] for j in wc) for p, _, wc in want]), rel_tol=1e-5
        )
        assert math.isclose(
            row["mass_exact"], mean([sum(p[j] for j in we) for p, we, _ in want]), rel_tol=1e-5
        )
    trace = SinkTrace(topk, scaling, answer_steps={12})
    trace.append(entry)
    (row,) = trace.rows
    assert row["t"] == 12 and row["layer"] == 3
    assert row["chosen"] == [0 in wc for _, _, wc in want] and row["exact"] == [0 in we for _, we, _ in want]
    for key, vals in (
        ("p0", [p[0] for p, _, _ in want]),
        ("mass_lfps", [sum(p[j] for j in wc) for p, _, wc in want]),
    ):
        assert all(
            math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(row[key], vals, strict=True)
        )
