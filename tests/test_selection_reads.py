"""Issue 20 (selection overhead at batch 16): host reads and host-built tensors in a prefill of VisiPruner,
SparseVLM, DART and PDrop. Fixed-budget VisiPruner with ``mask_until_fallback=None`` masks dropped tokens
until the fallback layer from ``MASK_BATCH`` samples on (one read for the plan's widths there, instead of
one per observed layer; off by default until timed on a GPU), with
the kept sets, per-sample FLOPs and fusion layers of the read-per-layer path (``mask_until_fallback=False``,
itself pinned against the official-rule ports elsewhere). Counted on the CPU with ``mmsink.tools.reads``
as ``evals/selection_ops.py`` does."""

import pytest
import torch
from test_reads import visipruner_prefill
from test_selection_syncs import selection_syncs
from tiny import batch, prompt, tiny_llava

from mmsink.pruners.visipruner import MASK_BATCH, VisiPruner


def prompts(n: int) -> list:
    """``n`` prompts of different lengths (a padded batch), one with two images."""
    out = [prompt(2 + i % 4, 4 + (3 * i) % 7, images=2 if i == 1 else 1, seed=i + 1) for i in range(n)]
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=16)


@pytest.mark.parametrize("threshold", [0.995, 0.9999])
def test_visipruner_batch_reads_twice(model, threshold):
    """``None`` at a batch of MASK_BATCH samples: 2 reads (the layout; the fallback's gather) where the gather
    per observed layer reads once per observed layer until every sample has fused; the same kept sets,
    per-sample FLOPs and fusion layers, logits within float rounding (bitwise when no sample fuses
    early)."""
    data = batch(prompts(MASK_BATCH), seed=3)
    auto = visipruner_prefill(model, data, budget=5, layer_threshold=threshold, mask_until_fallback=None)
    gather = visipruner_prefill(model, data, budget=5, layer_threshold=threshold)  # the default
    first, fallback = round(6 * 16 / 32) + 1, 16 // 2
    assert auto[0] == 2
    assert gather[0] == 1 + max(gather[4]) - first + 1
    assert auto[2:] == gather[2:]
    if min(auto[4]) == fallback:
        assert torch.equal(auto[1], gather[1])
    else:
        torch.testing.assert_close(auto[1], gather[1], atol=1e-5, rtol=1e-5)
    if threshold > 0.999:
        assert min(auto[4]) < fallback  # some sample fused early: the masked layers are exercised


def test_visipruner_small_batch_still_gathers_per_layer(model):
    """Below MASK_BATCH ``None`` is the read-per-layer path (a lone sample that fuses early runs narrow
    from the next layer on), as the default is; ``mask_until_fallback=True`` forces the masked one."""
    data = batch(prompts(2), seed=3)
    auto = visipruner_prefill(model, data, budget=5, mask_until_fallback=None)
    gather = visipruner_prefill(model, data, budget=5)
    masked = visipruner_prefill(model, data, budget=5, mask_until_fallback=True)
    assert auto[0] == gather[0] > 2 and masked[0] == 2
    assert auto[2:] == gather[2:] == masked[2:]


def test_visipruner_option_checked():
    with pytest.raises(ValueError, match="mask_until_fallback"):
        VisiPruner(budget=5, mask_until_fallback="yes")


@pytest.mark.parametrize("padded", [False, True])
def test_sparsevlm_builds_no_tensor_from_host_data(padded):
    """SparseVLM's hooks neither read the device nor build a tensor from host data (its raters' text
    after the first image is counted on the device); the raters' width is still read with layer 0's plan,
    outside the hooks (tests/test_sparsevlm.py pins it)."""
    model = tiny_llava(layers=8)
    if padded:
        data = batch([prompt(5, 7, images=2, seed=1), prompt(2, 4, seed=2), prompt(3, 9, seed=3)])
    else:
        data = batch([prompt(5, 7, seed=1), prompt(5, 7, seed=2)])
    assert not selection_syncs(model, data, "sparsevlm", {"budget": 12})
