"""The grouped-attention primitive's fused path: when the plain attention's kernel returns each row's LSE
(causal, no padding), a group whose output is not needed is not attended and its mass is what the other
groups leave. Against the path that attends every group (and, in fp32 on CPU, against plain matmuls)."""

import pytest
import torch

from mmsink.core import attention as att


def case(device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    b, h, n, d = 2, 4, 48, 64
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    member = torch.zeros(b, n, dtype=torch.bool, device=device)
    member[0, 5:30], member[1, 9:40] = True, True  # each sample's image span
    valid = torch.ones(b, n, dtype=torch.bool, device=device)
    groups = [att.group_indices(~member), att.group_indices(member)]
    rows = ~member & (member.cumsum(1) > 0)  # text after the image

    def mix(outs, masses, ri, vv):  # drop the image mass (VisiPruner's shallow layers): O_img unused
        return masses[0][..., None] * outs[0].float() + 0.25 * masses[1][..., None]

    return q, k, v, valid, rows, groups, mix


def run(q, k, v, valid, rows, groups, mix, fused):
    return att.reweighted_attention(
        q,
        k,
        v,
        None,
        valid,
        q.shape[-1] ** -0.5,
        "sdpa",
        rows,
        groups,
        mix,
        skip=1 if fused else None,
        dense=True,
    )


def reference(q, k, v, rows, groups, mix_scale=0.25):
    """Plain matmuls: text rows keep the softmax weights of non-image keys, plus 0.25 x image mass."""
    n = q.shape[2]
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    p = s.softmax(-1)
    img = torch.zeros_like(rows)
    for i, idx in enumerate(groups[1]):
        img[i, idx[idx >= 0]] = True
    full = p @ v.float()
    edited = (p * (~img)[:, None, None, :]) @ v.float() + mix_scale * (p * img[:, None, None, :]).sum(
        -1, True
    )
    return torch.where(rows[:, None, :, None], edited, full).transpose(1, 2)


def test_fused_path_on_cpu_matches_every_group_attended_and_plain_matmuls(monkeypatch):
    q, k, v, valid, rows, groups, mix = case("cpu", torch.float32)
    calls = []
    real = att.attention_with_lse
    monkeypatch.setattr(att, "attention_with_lse", lambda *a: calls.append(1) or real(*a))
    fused, f_flops = run(q, k, v, valid, rows, groups, mix, True)
    plain, p_flops = run(q, k, v, valid, rows, groups, mix, False)
    assert len(calls) == 1 and f_flops < p_flops  # the image group was not attended
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, reference(q, k, v, rows, groups), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_path_on_cuda(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v, valid, rows, groups, mix = case("cuda", dtype)
    assert att.attention_with_lse(q, k, v, 0.125) is not None  # the flash kernel returns its LSE here
    fused, _ = run(q, k, v, valid, rows, groups, mix, True)
    plain, _ = run(q, k, v, valid, rows, groups, mix, False)
    torch.testing.assert_close(fused.float(), plain.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fused.float(), reference(q, k, v, rows, groups), atol=3e-2, rtol=3e-2)


def test_memo_keeps_the_masks_for_the_same_mask_object_only():
    """Layers that share rows, groups and mask reuse the memo's masks (bitwise the output without it); a
    call with another mask object rebuilds them."""
    q, k, v, valid, rows, groups, mix = case("cpu", torch.float32)
    q2, k2, v2 = case("cpu", torch.float32, seed=1)[:3]  # the next layer's
    padded = valid.clone()
    padded[0, :3] = False  # sample 0 left-padded: a 2-D mask

    def go(q, k, v, mask, memo):
        return att.reweighted_attention(q, k, v, mask, valid, 0.125, "sdpa", rows, groups, mix, memo=memo)[0]

    memo = {}
    assert torch.equal(go(q, k, v, None, memo), go(q, k, v, None, None))
    allowed = memo["allowed"]
    assert torch.equal(go(q2, k2, v2, None, memo), go(q2, k2, v2, None, None))
    assert memo["allowed"] is allowed and len(memo["groups"]) == 2  # reused: one entry per group
    out = go(q2, k2, v2, padded, memo)
    assert memo["allowed"] is not allowed
    assert torch.equal(out, go(q2, k2, v2, padded, None))
    assert not torch.equal(out, go(q2, k2, v2, None, None))
