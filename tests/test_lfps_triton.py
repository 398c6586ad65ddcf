"""LFPS's sparse step as Triton kernels (``mmsink.kv.lfps_triton``) against the torch step it replaces
(``mmsink.kv.sparse.step(..., dense_step=False)``): the same chosen slot sets, outputs within 1e-4.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernels are
defined, so in a subprocess: this file run as a script prints one JSON line per case); with CUDA the
``gpu`` tests run them compiled. bf16 inputs get the same 1e-4 bound: both sides score and sum in fp32
from the same bf16 numbers, only the order of the fp32 sums differs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from triton_run import compile_for_hopper, interpret, on_gpu, print_cases

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)
BOUND = 1e-4  # max |kernel - step| of the fp32 attention output, fp32 and bf16 inputs

# name -> the shapes and options of one comparison (SEEDS each). Keys are random with a few slots
# pulled towards each head's query (high, well separated scores, as trained attention has): no exact ties.
BASE = dict(b=2, h=2, hk=2, t=120, d=16, topk=12, expand=1, sinks=0, width=None, pads=(0, 7), span=None)
CASES = {
    "plain": {},
    "sinks": dict(sinks=3, pads=(0, 11)),
    "gqa": dict(b=1, h=4, hk=1, pads=(3,)),
    "static buffer": dict(width=170),  # generate_fast's buffer: length a device scalar, < width
    "short samples": dict(b=3, pads=(0, 110, 60), sinks=2, width=150),  # sample 1 holds 10 <= topk keys
    "all long": dict(all_long=True),  # generate's call after its host check: no per-sample check
    "crowded history": dict(span=30, expand=2),  # overlapping shifts, a repeated entry, -1 entries
    "expand 0": dict(expand=0, sinks=1),
    "narrow history": dict(hist=7),  # a history narrower than topk (an earlier, shorter step's)
    "few candidates": dict(hist=4, expand=0, width=130),  # <= topk candidates in a long sample: keys counted
    "split blocks": dict(
        b=1, h=1, hk=1, t=600, topk=96, d=32, sinks=4, pads=(5,)
    ),  # several programs per head in the scores
    "bf16": dict(dtype="bf16", hk=1, sinks=2, width=150),
}
# GPU only (too slow interpreted): LLaMA-7B's decode attention, as evals/kv_decode.py --attention-only
GPU_CASES = {
    "7b shape": dict(b=1, h=32, hk=32, t=8192, d=128, topk=512, pads=(0,), width=8448, dtype="bf16"),
    "7b shape, sinks, two samples": dict(b=2, h=32, hk=8, t=4096, d=128, topk=512, pads=(0, 3000), sinks=4),
}


def inputs(seed: int, device="cpu", dtype="fp32", hist=None, span=None, **c):
    """(q, key, value, valid, hist, cfg, length, all_long) of one case."""
    g = torch.Generator().manual_seed(seed)
    b, h, hk, t, d, topk = c["b"], c["h"], c["hk"], c["t"], c["d"], c["topk"]
    width = c["width"] or t
    q = torch.randn(b, h, d, generator=g)
    key = torch.randn(b, hk, width, d, generator=g)
    for i in range(b):  # a few slots per head aligned with its query
        for j in range(h):
            hot = torch.randint(0, t, (4,), generator=g)
            key[i, j // (h // hk), hot] += 2 * q[i, j] / q[i, j].norm() * torch.rand(4, 1, generator=g)
    value = torch.randn(b, hk, width, d, generator=g)
    valid = torch.zeros(b, width, dtype=torch.bool)
    for i, pad in enumerate(c["pads"]):
        valid[i, pad:t] = True
    kh = topk if hist is None else hist
    pool = span or t - 1  # the history's slots come from the last ``pool`` slots before the newest
    rows = [torch.randperm(pool, generator=g)[:kh] + t - 1 - pool for _ in range(b * h)]
    prev = torch.stack(rows).view(b, h, kh)
    prev[0, 0, -3:] = -1  # empty entries
    if span:
        prev[-1, -1, 1] = prev[-1, -1, 0]  # a repeated slot
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    q, key, value = (x.to(device, dt) for x in (q, key, value))
    length = None if width == t else torch.tensor(t, device=device)
    cfg = SimpleNamespace(topk=topk, expand=c["expand"], dense_steps=2, sinks=c["sinks"])
    return q, key, value, valid.to(device), prev.to(device), cfg, length


def compare(name: str, seed: int, device="cpu") -> dict:
    """Kernel vs torch step on one case: same sets, max output difference, whether top-k cut anything."""
    from mmsink.kv.lfps_triton import sparse_step
    from mmsink.kv.sparse import step

    c = dict(BASE, **{**CASES, **GPU_CASES}[name])
    all_long = c.pop("all_long", False)
    q, key, value, valid, hist, cfg, length = inputs(seed, device, **c)
    scale = c["d"] ** -0.5
    want_out, want = step(q, key, value, valid, hist, cfg, False, scale, all_long, length=length)
    t0 = time.perf_counter()
    out, got = sparse_step(
        q, key, value, valid, hist, cfg.topk, cfg.expand, scale, cfg.sinks, length, all_long
    )
    took = time.perf_counter() - t0
    sets = [[set(s[s >= 0].tolist()) for s in row] for row in got]
    packed = all(  # chosen slots first, -1 after them
        bool((s[: int((s >= 0).sum())] >= 0).all()) for row in got for s in row
    )
    real = valid.sum(1).tolist()
    return dict(
        same=sets == [[set(s[s >= 0].tolist()) for s in row] for row in want],
        err=float((out - want_out).abs().max()),
        packed=packed,
        # some long sample's choice is a strict subset of its real keys (the sparse rule ran)
        cut=any(len(s) < real[i] and real[i] > cfg.topk for i, row in enumerate(sets) for s in row),
        shape=list(got.shape) == [c["b"], c["h"], min(cfg.topk, key.shape[2])],
        s=round(took, 3),
    )


@pytest.fixture(scope="module")
def interpreted():
    """Every case and seed through Triton's interpreter, in one subprocess."""
    return interpret(__file__)


def check(r: dict) -> None:
    assert r["same"], "chosen slot sets differ from mmsink.kv.sparse.step's"
    assert r["err"] <= BOUND
    assert r["packed"] and r["shape"] and r["cut"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_equals_torch_step_interpreted(interpreted, name):
    for seed in SEEDS:
        check(interpreted[(name, seed)])


def test_generate_fast_with_the_kernel_equals_generate(interpreted):
    """SparseDecoder runs the kernel for its sparse steps (interpreter, CPU): generate's tokens."""
    r = interpreted[("generate_fast", 0)]
    assert r["kernel_calls"] > 0 and r["same_tokens"], r


def test_refused_inputs():
    pytest.importorskip("triton")
    from mmsink.kv.lfps_triton import sparse_step

    q, key, value, valid, hist, cfg, _ = inputs(0, **dict(BASE, h=4))
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2 key heads"):
        sparse_step(q[:, :3], key, value, valid, hist[:, :3], 12, 1, 1.0)
    with pytest.raises(ValueError, match="sinks 12 not in"):
        sparse_step(q, key, value, valid, hist, 12, 1, 1.0, sinks=12)
    with pytest.raises(ValueError, match="out_hist must be"):
        sparse_step(q, key, value, valid, hist, 12, 1, 1.0, out_hist=hist[..., :5])
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="runs on CUDA"):
            sparse_step(q, key, value, valid, hist, 12, 1, 1.0)


def test_kernels_compile_for_hopper():
    """Both kernels through Triton's whole compiler (PTX and ptxas, bundled with Triton) for sm_90, at
    evals/kv_decode.py's shapes (32 x 128 bf16, topk 512): the interpreter does not type-check what the
    GPU compiler does. The variants with the most code: sinks, the per-sample short check."""
    from mmsink.kv import lfps_triton as lt

    ptr = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", valid_ptr="*u8", hist_ptr="*i64", sink_ptr="*i64")
    ptr.update(len_ptr="*i64", score_ptr="*fp32", slot_ptr="*i32", nxt_ptr="*i64", w_ptr="*fp32")
    ptr.update(out_ptr="*fp32", scaling="fp32")
    scores = dict(EXPAND=1, SB=4, KB=512, BLK=64, QC=64, EB=16, D=128, DC=16, LEN_PTR=True, HAS_SINKS=True)
    select = dict(NM=2048, EB=16, KOB=512, NP=16, D=128, DC=32, BT=4096, CHECK_SHORT=True)
    compile_for_hopper([(lt._scores, scores, 4), (lt._select, select, 8)], ptr)


def test_switched_off_by_the_environment(monkeypatch):
    pytest.importorskip("triton")
    from mmsink.kv.lfps_triton import available

    monkeypatch.delenv("MMSINK_LFPS_TRITON", raising=False)
    assert available("cuda")
    monkeypatch.setenv("MMSINK_LFPS_TRITON", "0")
    assert not available("cuda")


def fast_vs_generate(device="cpu") -> dict:
    """generate_fast (the kernel in its sparse steps) == generate, tiny LLaVA, left-padded batch of two."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import batch, tiny_llava, two_prompts

    import mmsink
    from mmsink.kv import fast_sparse

    model = tiny_llava(layers=1).to(device)
    inputs = {k: v.to(device) for k, v in batch(two_prompts()).items()}
    mmsink.wrap(model, kv={"sparse": "lfps", "topk": 7, "sinks": 2, "dense_steps": 1})
    calls, plain = [], fast_sparse.lfps_triton.sparse_step

    def counted(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    fast_sparse.lfps_triton.sparse_step = counted
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        out = mmsink.generate_fast(model, max_new_tokens=4, compile=False, **inputs)
    fast_sparse.lfps_triton.sparse_step = plain
    return dict(kernel_calls=len(calls), same_tokens=bool(torch.equal(out, ref)))


@on_gpu
@pytest.mark.parametrize("name", sorted(CASES) + sorted(GPU_CASES))
def test_kernel_equals_torch_step_cuda(name):
    for seed in SEEDS:
        check(compare(name, seed, "cuda"))


@on_gpu
def test_generate_fast_with_the_kernel_equals_generate_cuda():
    r = fast_vs_generate("cuda")
    assert r["kernel_calls"] > 0 and r["same_tokens"], r


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1): one JSON line per result
    print_cases(CASES, SEEDS, compare, {"generate_fast": fast_vs_generate})
