"""The decode step's attention kernel (``mmsink.fast.decode_kernel``, ``StepOptions(attn="kernel")``)
against its torch reference, and the reference against SDPA: the attention output within fp32 rounding
(one bf16 rounding of the output for bf16 inputs), the buffers written exactly (key, value and validity
at ``start + t``, nothing else touched), its count of finished chunks back at zero (a second call on the
same counts gives the same output).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernels are
defined, so in a subprocess: this file run as a script prints one JSON line per case); with CUDA the
``gpu`` tests run them compiled. Cases: GQA (7 query heads per KV head, as Qwen2-VL-7B), several chunks
per head with the slot at a chunk's first and last position, holes in the validity, batch > 1, the rotary
embedding applied in the kernel ("rotated"), several loop steps per program ("steps")."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from triton_run import compile_for_hopper, interpret, on_gpu, print_cases

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # bf16: the output rounded once (|o| < 2: 2 ** -7)

BASE = dict(b=1, h=4, kvh=4, s=100, d=16, slot=53, dtype="float32")
CASES = {
    "plain": {},
    "gqa": dict(b=2, h=14, kvh=2, s=77, d=32, slot=40),
    "gqa, batch": dict(b=3, h=4, kvh=1, s=300, slot=151),
    "bf16": dict(b=2, h=8, kvh=8, s=64, dtype="bfloat16", slot=10),
    "slot first": dict(s=256, slot=0),
    "slot last": dict(s=130, slot=129),
    "one chunk, batch": dict(b=4, h=2, kvh=2, s=16, slot=9),  # no partials
    "one chunk, gqa, bf16": dict(b=8, h=8, kvh=2, s=32, slot=31, dtype="bfloat16"),  # s = a step of 32
    "rotated": dict(rot=True),
    "rotated, gqa, bf16": dict(b=2, h=14, kvh=2, s=77, d=32, slot=40, dtype="bfloat16", rot=True),
    "rotated, one chunk, batch": dict(b=4, h=2, kvh=2, s=16, slot=9, rot=True),
    # several loop steps per program (block 16): in one chunk per head, and in four
    "steps": dict(s=300, slot=250, block=16, programs=4),
    "steps, chunks": dict(s=300, slot=250, block=16, programs=16, rot=True),
    "steps, chunks, gqa": dict(h=8, kvh=2, s=300, slot=299, block=16, programs=32),
}


def inputs(c: dict, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, c["dtype"])
    b, h, kvh, s, d = c["b"], c["h"], c["kvh"], c["s"], c["d"]
    q = torch.randn(b, 1, h, d, generator=g).to(dt).transpose(1, 2)  # the step's transposed view
    k, v = (torch.randn(b, kvh, 1, d, generator=g).to(dt) for _ in range(2))
    kb, vb = (torch.randn(b, kvh, s, d, generator=g).to(dt) for _ in range(2))
    ok = torch.rand(b, s, generator=g) > 0.3  # holes: a pruned layer's
    ok[:, c["slot"] :] = False  # after the prompt
    t = torch.tensor(3)
    start = torch.tensor(c["slot"]) - t
    rot = None
    if c.get("rot"):  # a rotary embedding's cos / sin: per-sample angles, the two halves alike
        angle = torch.rand(b, 1, d // 2, generator=g) * 6.3
        angle = torch.cat([angle, angle], -1)
        rot = tuple(f(angle).to(dt).to(device) for f in (torch.cos, torch.sin))
    return [x.to(device) for x in (q, k, v, kb, vb, ok, start, t)] + [rot]


def compare(name: str, seed: int, device="cpu") -> dict:
    from mmsink.fast import decode_kernel as dk

    c = {**BASE, **CASES[name]}
    q, k, v, kb, vb, ok, start, t, rot = inputs(c, seed, device)
    ref = [x.clone() for x in (kb, vb, ok)]
    want = dk.reference(q, k, v, *ref, start, t, 0.25, rot)
    before = [x.clone() for x in (kb, vb, ok)]
    lock = torch.zeros(c["b"] * c["h"] + 3, dtype=torch.int32, device=device)  # the step's: kept, reused
    tune = dict(block=c.get("block"), programs=c.get("programs", dk.PROGRAMS))
    got = dk.launch(q, k, v, kb, vb, ok, start, t, 0.25, rot, lock, **tune)
    again = dk.launch(q, k, v, kb.clone(), vb.clone(), ok.clone(), start, t, 0.25, rot, lock, **tune)
    slot = c["slot"]
    touched = [
        (after != old).nonzero()[:, 2 if after.dim() == 4 else 1].unique().tolist()
        for after, old in zip((kb, vb, ok), before)
    ]
    # the new key: exact, or where the kernel rotates it within one unit of the model's dtype (a fused
    # multiply-add, or the interpreter's conversion, may round the fp32 value the other way)
    key = (kb[:, :, slot] - ref[0][:, :, slot]).float().abs().max() / ref[0][:, :, slot].float().abs().max()
    kb[:, :, slot] = ref[0][:, :, slot]
    return dict(
        err=float((got.float() - want.float()).abs().max()),
        key_err=float(key),
        lock_cleared=not lock.any().item() and torch.equal(got, again),
        buffers=all(torch.equal(x, y) for x, y in zip((kb, vb, ok), ref)),
        only_slot=all(set(x) <= {slot} for x in touched) and touched[0] == [slot],
        shape=list(got.shape) == [c["b"], c["h"], 1, c["d"]] and got.dtype == q.dtype,
    )


@pytest.fixture(scope="module")
def interpreted():
    """Every case and seed through Triton's interpreter, in one subprocess."""
    return interpret(__file__)


def check(r: dict, name: str) -> None:
    dt = getattr(torch, {**BASE, **CASES[name]}["dtype"])
    assert r["err"] <= BOUND[dt], r
    assert r["key_err"] <= (torch.finfo(dt).eps if "rot" in {**BASE, **CASES[name]} else 0), r
    assert r["buffers"] and r["only_slot"] and r["shape"] and r["lock_cleared"], r


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_equal_the_reference_interpreted(interpreted, name):
    for seed in SEEDS:
        check(interpreted[(name, seed)], name)


def test_generate_fast_with_the_kernels_equals_generate(interpreted):
    """generate_fast's step with ``attn="kernel"`` (interpreter, CPU, fp32; with and without fused
    projections): greedy generate's tokens on a pruned, left-padded batch."""
    r = interpreted[("generate_fast", 0)]
    assert r["kernel_calls"] > 0 and r["rotated_calls"] == r["kernel_calls"] and r["same_tokens"], r


def fast_vs_generate(device="cpu", kv_heads: int = 2) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import batch, prompt, tiny_llava

    import mmsink
    from mmsink.fast import decode_kernel as dk
    from mmsink.fast.fuse import StepOptions

    model = tiny_llava(kv_heads=kv_heads).to(device)
    inputs = {k: v.to(device) for k, v in batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)]).items()}
    mmsink.wrap(model, prune="fastv", budget=6)
    calls, plain = [], dk.launch

    def counted(*args, **kwargs):
        calls.append(args[9] is not None)  # rot: the model's rotation has the kernels' form
        return plain(*args, **kwargs)

    dk.launch = counted
    same = []
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        for fused in (False, True):
            step = StepOptions(fuse=fused, attn="kernel")
            out = mmsink.generate_fast(model, max_new_tokens=4, compile=False, step=step, **inputs)
            same.append(bool(torch.equal(out, ref)))
    dk.launch = plain
    return dict(kernel_calls=len(calls), rotated_calls=sum(calls), same_tokens=all(same))


@pytest.mark.parametrize("name", ["plain", "gqa", "gqa, batch"])
def test_reference_is_sdpa_after_the_write(name):
    """The reference (what the kernels are held to) against SDPA with a boolean mask, fp32."""
    from mmsink.fast import decode_kernel as dk

    c = {**BASE, **CASES[name]}
    for seed in SEEDS:
        q, k, v, kb, vb, ok, start, t, _ = inputs(c, seed)
        slot = int(start + t)
        got = dk.reference(q, k, v, kb, vb, ok, start, t, 0.25)
        assert torch.equal(kb[:, :, slot], k[:, :, 0]) and torch.equal(vb[:, :, slot], v[:, :, 0])
        mask = ok.clone()
        mask[:, slot + 1 :] = False
        mask[:, slot] = True
        assert torch.equal(ok, mask)  # the validity was set at the slot
        want = F.scaled_dot_product_attention(
            q, kb, vb, attn_mask=mask[:, None, None], scale=0.25, enable_gqa=c["h"] != c["kvh"]
        )
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_kernels_compile_for_hopper():
    """The kernel (with and without its combine, rotating or not) through Triton's whole compiler for
    sm_90 (the interpreter does not type-check what the GPU compiler does), at LLaVA-1.5-7B's and
    Qwen2-VL-7B's head layouts."""
    from mmsink.fast import decode_kernel as dk

    ptr = {n: "*bf16" for n in ("q_ptr", "kn_ptr", "vn_ptr", "k_ptr", "v_ptr", "o_ptr", "cos_ptr", "sin_ptr")}
    ptr.update(ok_ptr="*u8", start_ptr="*i64", t_ptr="*i64", lock_ptr="*i32", scale="fp32")
    ptr.update(po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32")
    kernels = [
        (dk._attn_split, dict(H=32, G=1, D=128, BLOCK=64, NSP=16, ROT=True), dk.WARPS),
        (dk._attn_split, dict(H=28, G=7, D=128, BLOCK=64, NSP=32, ROT=True), dk.WARPS),
        (dk._attn_split, dict(H=32, G=1, D=128, BLOCK=64, NSP=1, ROT=False), dk.WARPS),
        (dk._attn_split, dict(H=32, G=1, D=128, BLOCK=32, NSP=1, ROT=True), dk.WARPS),
    ]
    compile_for_hopper(kernels, ptr)


def test_rotation_is_the_models():
    """``rotate`` (the kernels' rotation, and what ``reference`` applies) is bitwise the rotation of
    LLaVA's (Llama) and Qwen2-VL's text models; ``standard_rope`` tells them from another form (GPT-J's
    interleaved pairs), which keeps its own rotation before the kernels."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    from mmsink.fast.decode_kernel import rotate, standard_rope

    def interleaved(q, k, cos, sin):
        def turn(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)

        return q * cos[:, None] + turn(q) * sin[:, None], k * cos[:, None] + turn(k) * sin[:, None]

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 1, 16, generator=g).bfloat16(), torch.randn(2, 2, 1, 16, generator=g).bfloat16()
    cos, sin = torch.randn(2, 1, 16, generator=g).bfloat16(), torch.randn(2, 1, 16, generator=g).bfloat16()
    for module in (modeling_llama, modeling_qwen2_vl):
        assert standard_rope(module.apply_rotary_pos_emb)
        qr, kr = module.apply_rotary_pos_emb(q, k, cos, sin)
        assert torch.equal(rotate(q, cos, sin), qr) and torch.equal(rotate(k, cos, sin), kr)
    assert not standard_rope(interleaved)


def test_plan_spreads_the_slots():
    """Chunks cover every slot in whole loop steps and no step more, about PROGRAMS programs (7B layouts,
    batch 1 and 16; serving batches: one chunk per head); steps of 32 slots for buffers of up to 512, of 64
    above (head size 128: parts 49-51's timings)."""
    from mmsink.fast.decode_kernel import PROGRAMS, plan

    shapes = [(1, 32, 768, 128), (16, 32, 768, 128), (1, 28, 2688, 128), (1, 32, 16, 128), (2, 4, 77, 32)]
    shapes += [(128, 32, 512, 128), (412, 32, 512, 128), (75, 32, 3072, 128)]  # serving batches
    for b, h, s, d in shapes:
        block, chunk = plan(b, h, s, d)
        assert chunk % block == 0 and block * d <= 8192
        assert d != 128 or block == (32 if s <= 512 else 64)
        assert chunk < s + block  # no loop step past the slots
        programs = b * h * -(-s // chunk)
        assert programs <= PROGRAMS + b * h and (chunk == block or programs > PROGRAMS // 2)
    for name, c in CASES.items():  # the "one chunk" cases stay one chunk per head: no partials to merge
        c = {**BASE, **c}
        assert not name.startswith("one chunk") or plan(c["b"], c["h"], c["s"], c["d"])[1] >= c["s"], name


def test_long_wide_buffers_attend_through_sdpa(monkeypatch):
    """Where ``through_sdpa`` (MHA, >= LONG slots, >= WIDE batch x heads) ``attend`` on a GPU runs SDPA after
    the kernel's rotation and writes, not the kernel: the same output as the reference within fp32
    rounding and the same buffers; elsewhere the kernel. The rule at serving's and batch-1 shapes."""
    from mmsink.fast import decode_kernel as dk

    assert dk.through_sdpa(76, 32, 32, 3072) and dk.through_sdpa(8, 32, 32, 2048)
    assert not dk.through_sdpa(1, 32, 32, 3072)  # batch 1: the kernel
    assert not dk.through_sdpa(412, 32, 32, 512) and not dk.through_sdpa(16, 32, 32, 768)  # short buffers
    assert not dk.through_sdpa(16, 28, 4, 2688)  # GQA: not measured
    calls = []
    monkeypatch.setattr(dk, "available", lambda device: True)
    monkeypatch.setattr(dk, "_attend_op", lambda *a: calls.append(a) or a[0])
    monkeypatch.setattr(dk, "LONG", 64)
    monkeypatch.setattr(dk, "WIDE", 4)
    for name, wide in (("rotated", True), ("gqa, batch", False), ("one chunk, batch", False)):
        c = {**BASE, **CASES[name]}
        for seed in SEEDS:
            q, k, v, kb, vb, ok, start, t, rot = inputs(c, seed)
            ref = [x.clone() for x in (kb, vb, ok)]
            want = dk.reference(q, k, v, *ref, start, t, 0.25, rot)
            got = dk.attend(q, k, v, kb, vb, ok, start, t, 0.25, rot)
            assert dk.through_sdpa(c["b"], c["h"], c["kvh"], c["s"]) == wide
            if wide:
                assert torch.allclose(got, want, atol=1e-5) and not calls
                assert all(torch.equal(x, y) for x, y in zip((kb, vb, ok), ref))
            else:
                assert calls and got is q
                calls.clear()


def test_generate_fast_through_sdpa_equals_generate(monkeypatch):
    """generate_fast's kernel step with every layer past ``through_sdpa``'s bounds (set to 1: SDPA after the
    kernel's rotation and writes, the kernel never launched; CPU, fp32, an MHA tiny LLaVA): greedy
    generate's tokens."""
    from mmsink.fast import decode_kernel as dk

    monkeypatch.setattr(dk, "available", lambda device: True)
    monkeypatch.setattr(dk, "LONG", 1)
    monkeypatch.setattr(dk, "WIDE", 1)
    r = fast_vs_generate(kv_heads=4)  # one KV head per query head, as the rule asks
    assert r["kernel_calls"] == 0 and r["same_tokens"], r


def test_switched_off_by_the_environment(monkeypatch):
    pytest.importorskip("triton")
    from mmsink.fast.decode_kernel import available

    monkeypatch.setenv("MMSINK_DECODE_KERNEL", "0")
    assert not available("cuda")


@on_gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_equal_the_reference_cuda(name):
    for seed in SEEDS:
        check(compare(name, seed, "cuda"), name)


@on_gpu
def test_generate_fast_through_sdpa_equals_generate_cuda(monkeypatch):
    from mmsink.fast import decode_kernel as dk

    monkeypatch.setattr(dk, "LONG", 1)
    monkeypatch.setattr(dk, "WIDE", 1)
    r = fast_vs_generate("cuda", kv_heads=4)
    assert r["kernel_calls"] == 0 and r["same_tokens"], r


@on_gpu
def test_generate_fast_with_the_kernels_equals_generate_cuda():
    r = fast_vs_generate("cuda")
    assert r["kernel_calls"] > 0 and r["same_tokens"], r


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1): one JSON line per result
    print_cases(CASES, SEEDS, compare, {"generate_fast": fast_vs_generate})
