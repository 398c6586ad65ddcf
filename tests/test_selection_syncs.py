"""No host sync inside a method's selection step at batch > 1 (issue 20: selection overhead). A sync there
makes the GPU drain its queue and then wait while the host launches the whole selection op by op: the
bench's batch-16 overhead. Counted on the CPU inside the method's own hooks (``after_layer``,
``before_llm``, the vision-stage ``select``, the attention edits it hands a layer): reads of tensor values
(``mmsink.tools.reads``) and tensors built from host data (``aten::lift_fresh``, e.g. ``torch.tensor(list,
device=...)``: a blocking copy on a GPU, which waits for the queued layers like a read). The reads the plan
makes between layers are pinned per method in ``test_reads.py``."""

import collections

import pytest
import torch
from tiny import batch, prompt, tiny_llava
from torch.utils._python_dispatch import TorchDispatchMode

import mmsink
from mmsink.tools.reads import DeviceReads, selection_hooks

SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.lift_fresh.default"}


class SyncOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNC_OPS:
            self.seen[str(func)] += 1
        return func(*args, **(kwargs or {}))


def selection_counted(pruner, found: collections.Counter, calls: collections.Counter):
    """Run the pruner's hooks (and the attention edits its directives return) under both counters."""

    def counted(fn, name):
        def run(*a, **k):
            calls[name] += 1
            with DeviceReads() as r, SyncOps() as ops:
                out = fn(*a, **k)
            found.update({f"{name}: read at {s}": c for s, c in r.sites.items()})
            found.update({f"{name}: {op}": c for op, c in ops.seen.items()})
            return out

        return run

    return selection_hooks(pruner, counted)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=8)


def inputs(padded: bool):
    if padded:
        return batch([prompt(5, 7, images=2, seed=1), prompt(2, 4, seed=2), prompt(3, 9, seed=3)])
    return batch([prompt(5, 7, seed=1), prompt(5, 7, seed=2)])


def selection_syncs(model, data, method, opts) -> collections.Counter:
    found, calls = collections.Counter(), collections.Counter()
    mmsink.wrap(model, prune=method, **opts)
    try:
        pruner = mmsink.api.get_handle(model).pruner
        with torch.no_grad(), selection_counted(pruner, found, calls):
            model(**data)
    finally:
        mmsink.unwrap(model)
    assert calls["after_layer"] or calls["select"]  # the selection ran under the counters
    return found


METHODS = [
    ("fastv", {"budget": 6}),
    ("dart", {"budget": 8}),
    ("dart", {"budget": 0.43}),
    ("visipruner", {"budget": 6}),
    ("visipruner", {"budget": 6, "layer_threshold": 0.9999, "mask_until_fallback": True}),  # early, masked
    ("visipruner", {}),
    ("visionzip", {"budget": 6}),
]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("method,opts", METHODS)
def test_no_sync_in_the_selection_step(model, method, opts, padded):
    assert not selection_syncs(model, inputs(padded), method, opts)


def test_the_count_sees_a_sync_in_a_hook(model, monkeypatch):
    """The guard can fail: DART's key norms made to read a value and to build a tensor from host data (what
    its per-pivot counts and the padding offsets did before) are both reported, from the hook."""
    from mmsink.pruners import dart

    real = dart.local_l1

    def leaky(k, valid, pe, rope):
        offsets = torch.tensor([valid.shape[1]], device=k.device)
        return real(k, valid, pe, rope) + 0 * int(offsets.max())

    monkeypatch.setattr(dart, "local_l1", leaky)
    found = selection_syncs(model, inputs(True), "dart", {"budget": 8})
    assert found["after_layer: aten.lift_fresh.default"] == 1
    assert found["after_layer: aten._local_scalar_dense.default"] == 1
    assert sum(c for k, c in found.items() if "read at" in k and "test_selection_syncs.py" in k) == 1
