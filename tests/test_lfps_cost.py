"""LFPS decode attention (issue 17): a sparse step reads no O(context) bytes of keys or values, and its
choice equals the rule computed from all keys' scores (the formulation the sparse step replaced)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from evals.op_cost import OpCost
from mmsink.kv.sparse import candidates, sink_slots, step


def cost(fn) -> int:
    with OpCost() as c:
        fn()
    return c.read + c.written


def meta_step(context: int, dense: bool, all_long, spare: int = 0) -> int:
    """Estimated bytes of one bf16 layer step (8 heads x 64, top-128) at ``context`` keys, on meta."""
    dev, heads, dim = "meta", 8, 64
    q = torch.empty(1, heads, dim, device=dev, dtype=torch.bfloat16)
    k = torch.empty(1, heads, context + spare, dim, device=dev, dtype=torch.bfloat16)
    valid = torch.ones(1, context + spare, dtype=torch.bool, device=dev)
    hist = torch.zeros(1, heads, 128, dtype=torch.long, device=dev)
    cfg = SimpleNamespace(topk=128, expand=1, dense_steps=1, sinks=0)
    length = torch.zeros((), dtype=torch.long, device=dev) if spare else None
    return cost(lambda: step(q, k, k, valid, hist, cfg, dense, 0.1, all_long, length=length))


def test_sparse_step_reads_no_full_pass():
    """4k -> 16k keys: the sparse step's bytes do not change when every sample is known to be long, and
    grow by the validity scan only (bytes per slot, not K / V rows: 2 x 8 x 64 x 2 B = 2 KiB a slot) when
    that is decided on the device (generate_fast's call, a wider buffer); the dense step reads every row."""
    kv_per_slot = 2 * 8 * 64 * 2
    assert meta_step(4096, False, True) == meta_step(16384, False, True)
    grow = (meta_step(16384, False, False, spare=256) - meta_step(4096, False, False, spare=256)) / 12288
    assert 0 < grow < 32
    dense_grow = (meta_step(16384, True, None) - meta_step(4096, True, None)) / 12288
    assert dense_grow > kv_per_slot


def sorted_candidates(hist, t, expand, width, sinks=None):
    """Per row: every shift of every entry, the newest slot and the sinks; out of range -> a sentinel past
    the end; sorted; a repeat or a sentinel -> -1 (lists, one row at a time)."""
    b, h, _ = hist.shape
    rows = []
    for i in range(b):
        row = []
        for j in range(h):
            vals = [p + o for p in hist[i, j].tolist() if p >= 0 for o in range(-expand, expand + 2)]
            vals += [width + 9] * sum(2 * expand + 2 for p in hist[i, j].tolist() if p < 0)
            vals += [t - 1] + ([] if sinks is None else sinks[i].tolist())
            vals = sorted(v if 0 <= v < t else width + 9 for v in vals)
            row.append([-1 if v >= t or (n and v == vals[n - 1]) else v for n, v in enumerate(vals)])
        rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize("seed", range(6))
def test_candidates_layout(seed):
    """Ascending slots, -1 at each repeat (in place) and for everything out of range (at the end): the
    layout the sort-everything formulation gives, so ties in the top-k resolve as before."""
    g = torch.Generator().manual_seed(seed)
    b, h, k, width, expand = 2, 3, 7, 40, seed % 3
    t = width - 5 * (seed % 2)
    hist = torch.randint(0, t - 1, (b, h, k), generator=g)
    hist[:, 0, :3] = torch.tensor([0, 1, t - 2])  # edges: shifts below 0 and past the newest
    hist = torch.where(torch.rand(b, h, k, generator=g) < 0.2, -1, hist)
    valid = torch.ones(b, width, dtype=torch.bool)
    valid[1, :4] = False
    sinks = sink_slots(valid, 2) if seed % 2 else None
    length = torch.tensor(t) if t < width else t
    got = candidates(hist, length, expand, width, sinks)
    assert torch.equal(got, sorted_candidates(hist, t, expand, width, sinks))


def reference(q, keys, values, valid, hist, topk, expand, t, scale, sinks):
    """The rule from every key's score (float64): per sample and head the chosen slots and the output."""
    b, h, d = q.shape
    hk = keys.shape[1]
    chosen, out = [], torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        real = [j for j in range(t) if valid[i, j]]
        kept = set(real[:sinks])
        row = []
        for head in range(h):
            k, v = keys[i, head // (h // hk)].double(), values[i, head // (h // hk)].double()
            score = (k @ q[i, head].double()) * scale
            if len(real) <= topk:
                cand = set(real)
            else:
                near = {p + o for p in hist[i, head].tolist() if p >= 0 for o in range(-expand, expand + 2)}
                cand = {j for j in near | {t - 1} | kept if 0 <= j < t and valid[i, j]}
            rest = sorted(cand - kept, key=lambda j: -float(score[j]))
            pick = sorted(kept | set(rest[: topk - len(kept)]))
            row.append(set(pick))
            w = torch.softmax(score[pick], 0)
            out[i, head] = w @ v[pick]
        chosen.append(row)
    return chosen, out


@pytest.mark.parametrize("seed", range(8))
def test_sparse_step_equals_the_rule_from_all_scores(seed):
    """Batches with a short and a long sample, left padding, gaps, GQA, sinks, a static buffer wider than
    the keys held (generate_fast) and empty history entries: the chosen slots and the attention output
    equal the rule computed from every key's score; all samples long: the same with ``all_long``."""
    g = torch.Generator().manual_seed(seed)
    b, hk, grp, d, topk, expand = 3, 2, 2, 16, 10, seed % 3
    h = hk * grp
    sinks = (0, 2)[seed % 2]
    width = 48
    t = width - 6 * (seed % 3 == 0)
    keys = torch.randn(b, hk, width, d, generator=g)
    values = torch.randn(b, hk, width, d, generator=g)
    q = torch.randn(b, h, d, generator=g)
    valid = torch.zeros(b, width, dtype=torch.bool)
    valid[0, :t] = True
    valid[1, 3:t] = torch.rand(t - 3, generator=g) > 0.3
    valid[2, t - 8 : t] = True  # short: 8 real keys <= topk
    hist = torch.stack([torch.randperm(t - 1, generator=g)[:topk] for _ in range(b * h)]).view(b, h, topk)
    hist = torch.where(torch.rand(b, h, topk, generator=g) < 0.15, -1, hist)
    cfg = SimpleNamespace(topk=topk, expand=expand, dense_steps=1, sinks=sinks)
    length = torch.tensor(t) if t < width else None
    for rows, all_long in ((slice(None), False), (slice(0, 2), True)):
        args = (q[rows], keys[rows], values[rows], valid[rows], hist[rows])
        out, nxt = step(*args, cfg, False, 0.25, all_long, length=length)
        want, ref = reference(*args, topk, expand, t, 0.25, sinks)
        assert [[set(s[s >= 0].tolist()) for s in row] for row in nxt] == want
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert any(len(s) < int(valid[0].sum()) for s in want[0])  # sample 0 attends sparsely
