"""What a kv mode's decode step moves (issue 17: kv modes serve 2-5x slower than plain decoding). The step
is one CUDA graph on a GPU, so its cost is the bytes its kernels move; counted here on the CPU with
``evals.kv_serving_cpu.StepCost`` (aten ops with the bytes each reads and writes, in-place index writes as
the rows they write). See ``evals/results/kv_decode/serving_cpu.md``."""

from __future__ import annotations

import optimum.quanto  # noqa: F401  (int4: its import takes seconds, at collection)
import pytest
import torch
from tiny import batch, fast, module_model, prompt, prompts_with, tiny_llava

import mmsink
from evals.kv_serving_cpu import Counted, StepCost
from mmsink.fast.store import STORE
from mmsink.kv import fast as kvfast
from mmsink.kv import fast_quant
from mmsink.kv.window import rotate, turn_of

model, unwrapped = module_model(lambda: tiny_llava(layers=2))


def last_decoder(model):
    return next(reversed(model.__dict__[STORE].values()))


def rotate_half(keys, cos, sin):
    """The rotate-half form of RoPE (Llama's ``apply_rotary_pos_emb`` on keys), in fp32."""
    k = keys.float()
    half = k.shape[-1] // 2
    rot = torch.cat([-k[..., half:], k[..., :half]], -1)
    return (k * cos + rot * sin).to(keys.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotate_is_the_rotate_half_form_bitwise_and_moves_fewer_bytes(dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        keys = (torch.randn(2, 3, 40, 32, generator=g) * 20).to(dtype)
        cos, sin = turn_of(torch.randint(-5000, 5000, (2, 40), generator=g), inv)
        out = torch.full_like(keys, float("nan"))
        assert rotate(keys, cos, sin, out=out) is out
        assert torch.equal(out, rotate_half(keys, cos, sin))
        assert torch.equal(rotate(keys, cos, sin), out)
    if dtype == torch.bfloat16:  # bytes at a serving-like shape: bf16 keys, 8 heads sharing cos / sin
        keys = torch.randn(2, 8, 40, 32, generator=g).to(dtype)
        out = torch.empty_like(keys)
        with StepCost() as before:
            out.copy_(rotate_half(keys, cos, sin))  # what the window step did: rotate, then copy in
        with StepCost() as after:
            rotate(keys, cos, sin, out=out)
        assert after.read + after.written <= 0.75 * (before.read + before.written)


@pytest.mark.parametrize("kv", [{"quant": "int4", "group_size": 8}, {"quant": "int8", "group_size": 16}])
def test_quant_read_moves_a_bounded_multiple_of_the_keys(model, kv):
    """One layer's read (dequantize, slot order, the open group's exact ring, the exact sinks): no int64
    tensor of the keys' full size (``rank % g`` on the expanded index was one: 4x the bytes of bf16 keys),
    and at most 20x the bytes of that layer's dense keys (the full-size gathers and selects for the ring
    and the sinks made it 43x; now ~16x)."""
    mmsink.wrap(model, kv=kv)
    fast(model, batch(prompts_with(7)), 12)
    dec = last_decoder(model)
    b, hk, _, d = dec.k[0].shape
    cap = dec.seg_ok[0].shape[1]
    unit = b * hk * cap * d * dec.k[0].element_size()
    full = b * hk * cap * d
    for i in range(len(dec.k)):
        with StepCost() as cost, Counted() as ops:
            dec.read(i)
        assert not ops.syncs
        moved = cost.read + cost.written
        assert moved <= 20 * unit, (i, moved / unit)
    # an index (int64) tensor as large as the keys, among the outputs of the read's ops
    seen = []

    class Outputs(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            big = isinstance(out, torch.Tensor) and out.numel() >= full and out.dtype == torch.long
            if big and not func.is_view:
                seen.append(str(func))
            return out

    with Outputs():
        dec.read(0)
    assert seen == [], seen


def step_ops(model, kv, n: int, cls):
    """Ops and syncs of one decode step of ``cls`` with ``kv`` at batch ``n`` (prompts of one shape)."""
    counts = []
    plain = cls.step

    def counted(dec):
        with Counted() as c:
            plain(dec)
        counts.append((c.ops, sum(c.syncs.values())))

    cls.step = counted
    try:
        mmsink.wrap(model, kv=kv)
        fast(model, batch([prompt(3, 5, seed=s) for s in range(n)]), 4)
    finally:
        cls.step = plain
        mmsink.unwrap(model)
    assert len(set(counts)) == 1, counts
    return counts[0]


@pytest.mark.parametrize(
    "kv,cls",
    [
        ({"window": 8, "sinks": 4}, kvfast.WindowDecoder),
        ({"quant": "int4", "group_size": 8}, fast_quant.QuantDecoder),
    ],
)
def test_step_ops_do_not_grow_with_the_batch(model, kv, cls):
    """Per step: the same aten ops at batch 1 and 3, and no host sync (nothing per sample on the host)."""
    one, three = step_ops(model, kv, 1, cls), step_ops(model, kv, 3, cls)
    assert one == three and one[1] == 0, (one, three)
