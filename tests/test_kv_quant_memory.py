"""What the quantized kv mode holds while it prefills and fills ``generate_fast``'s store (issue 17), and
its host work per added sample. A layer's complete groups are quantized right after it takes the
forward's tokens, so the prefill holds at most one layer's full-precision keys / values (with "auto", the
layers up to ``sink_layer``), and nothing full-precision beyond the exact tails and sinks is left for the
fill. The old code held every layer's prompt until the forward ended, and after it through views."""

from __future__ import annotations

import collections

import optimum.quanto  # noqa: F401  (2 / 4 bits; its import takes seconds: at collection, not in a test)
import pytest
import torch
from tiny import batch, fast, fill_cache_alive_at_run, prompt, tiny_llava
from torch.utils._python_dispatch import TorchDispatchMode

import mmsink
from evals.kv_serving_cpu import SYNC_OPS, LiveBytes
from mmsink.fast import generate as fgen
from mmsink.kv import fast_quant, quant, store
from mmsink.kv.store import triple

HK, D = 2, 16  # tiny_llava's key / value heads and head size
INT4 = {"quant": "int4", "group_size": 8, "sinks": 4}
AUTO = {"quant": "int4", "group_size": 8, "sinks": "auto", "first": 2, "sink_dims": [5], "tau": 5.0}


def inputs(n: int = 2):
    ps = [prompt(40, 200, seed=1), prompt(60, 150, seed=2), prompt(20, 90, seed=3)]
    return batch(ps[:n])


def layer_kv(x) -> int:
    """Bytes of one layer's full-precision keys and values of the batch's real tokens (fp32)."""
    return 2 * int(x["attention_mask"].sum()) * HK * D * 4


def held(cache) -> int:
    """Bytes of the storages behind the cache's full-precision tensors (tails, exact sinks), each once: a
    view keeps its whole storage alive."""
    seen = {}
    for layer in cache.layers:
        for p in getattr(layer, "parts", []):
            for t in [p.tail_k, p.tail_v, *p.sink_k, *p.sink_v]:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("kv,before_final", [(INT4, 0), ({**AUTO, "sink_layer": 2}, 2)])
def test_prefill_and_fill_hold_one_layer_in_full_precision(monkeypatch, kv, before_final):
    """After each layer's cache update the full-precision bytes held stay under half a layer's keys /
    values (the open groups' tails and the sinks), plus, with "auto", the ``sink_layer`` layers before the
    flags are known; when the store is filled, under half a layer (the old code: all 6 layers)."""
    model = tiny_llava(layers=6)
    x = inputs()
    after_update, at_fill = [], []
    real_update, real_fill = quant.QuantCache.update, fast_quant.QuantDecoder.fill

    def update(self, *a, **k):
        out = real_update(self, *a, **k)
        after_update.append(held(self))
        return out

    def fill(self, cache, *a, **k):
        at_fill.append(held(cache))
        return real_fill(self, cache, *a, **k)

    monkeypatch.setattr(quant.QuantCache, "update", update)
    monkeypatch.setattr(fast_quant.QuantDecoder, "fill", fill)
    mmsink.wrap(model, kv=kv)
    fast(model, x, 3)
    with torch.no_grad():
        ref = model.generate(**x, max_new_tokens=3, do_sample=False)
    assert torch.equal(fast(model, x, 3), ref)
    one = layer_kv(x)
    assert len(after_update) >= 6 and at_fill
    assert max(after_update) <= (before_final + 0.5) * one, max(after_update) / one
    assert max(at_fill) <= 0.5 * one, max(at_fill) / one


def peak(layers: int, x) -> int:
    model = tiny_llava(layers=layers)
    mmsink.wrap(model, kv=INT4)
    fast(model, x, 2)  # the decoder (kept on the model) exists: the measured call is the prefill and fill
    live = LiveBytes()
    with live:
        fast(model, x, 2)
    return live.peak


def test_peak_live_bytes_per_layer():
    """The most bytes alive at once in a ``generate_fast`` call (tensors made in it), per added layer:
    under 0.6 of a layer's full-precision keys / values (now 0.40: the quantized prefill cache, 4 bits
    in groups of 8 with fp32 scales); the old code: 1.0."""
    x = inputs()
    grow = (peak(6, x) - peak(2, x)) / 4
    assert grow <= 0.6 * layer_kv(x), grow / layer_kv(x)


class Counted(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        self.syncs += str(func) in SYNC_OPS
        return func(*args, **(kwargs or {}))


def counts(model, x, kv, monkeypatch) -> dict:
    """Aten ops and sync ops of ``generate_fast``'s prefill and of the decoder's fill."""
    found = collections.Counter()

    def counted(fn, name):
        def run(*a, **k):
            with Counted() as c:
                out = fn(*a, **k)
            found[f"{name} ops"] += c.ops
            found[f"{name} syncs"] += c.syncs
            return out

        return run

    monkeypatch.setattr(fgen, "prefill", counted(fgen.prefill, "prefill"))
    monkeypatch.setattr(fast_quant.QuantDecoder, "fill", counted(fast_quant.QuantDecoder.fill, "fill"))
    if kv is not None:
        mmsink.wrap(model, kv=kv)
    fast(model, x, 3)
    if kv is not None:
        mmsink.unwrap(model)
    monkeypatch.undo()
    return found


def test_host_work_per_added_sample(monkeypatch):
    """Batch 3 against batch 1 (the same prompts repeated), 4 layers: the int4 prefill adds at most 100
    aten ops and 1 sync op per added sample beyond what the unwrapped prefill adds (now 79.5 and 0.5:
    per sample and layer, quanto's packing and the tails' copies; old: 201 and 5), and the fill at most
    45 ops and no sync per added sample (now 40: unpacking quanto's codes; old: 150 and 10)."""
    model = tiny_llava(layers=4)
    one = inputs(1)
    three = {k: v.repeat(3, *[1] * (v.dim() - 1)) for k, v in one.items()}
    plain = [counts(model, x, None, monkeypatch) for x in (one, three)]
    int4 = [counts(model, x, INT4, monkeypatch) for x in (one, three)]

    def per_sample(c, key):
        return (c[1][key] - c[0][key]) / 2

    extra = {k: per_sample(int4, k) - per_sample(plain, k) for k in ("prefill ops", "prefill syncs")}
    fill = {k: per_sample(int4, k) for k in ("fill ops", "fill syncs")}
    assert extra["prefill ops"] <= 100 and extra["prefill syncs"] <= 1, extra
    assert fill["fill ops"] <= 45 and fill["fill syncs"] == 0, fill


def parts_of(cache, bits: int) -> list:
    """Every layer's and sample's stored groups (codes unpacked), tails and exact sinks."""
    out = []
    for layer in cache.layers:
        for p in layer.parts:
            groups = [(*triple(c.keys, bits), *triple(c.values, bits), c.tokens) for c in p.chunks]
            out.append((groups, p.tail_k, p.tail_v, p.sink_rank, p.sink_k, p.sink_v))
    return out


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize(
    "kv", [INT4, {**AUTO, "sink_layer": 2, "quant": "int2"}, {"quant": "int8", "group_size": 16}]
)
def test_batched_sealing_is_bitwise_per_sample_sealing(monkeypatch, kv):
    """``generate``'s cache with the batch's groups quantized together (``seal_all``) holds bitwise what
    quantizing each sample alone (``seal``, ``SEAL_TOKENS`` = 1) holds: codes, scales, offsets, tails,
    exact sinks."""
    model = tiny_llava(layers=3)
    x = inputs(3)
    mmsink.wrap(model, kv=kv)
    bits = int(kv["quant"][3:])
    caches = []
    for tokens in (store.SEAL_TOKENS, 1):
        monkeypatch.setattr(store, "SEAL_TOKENS", tokens)
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
        caches.append(parts_of(out.past_key_values, bits))
    assert any(p[0] for p in caches[0]) and any(p[3] for p in caches[0])  # groups and sinks were stored
    assert same(caches[0], caches[1])


@pytest.mark.parametrize(
    "kv,decoder",
    [
        (INT4, "mmsink.kv.fast_quant.QuantDecoder"),
        ({"window": 64, "sinks": 4}, "mmsink.kv.fast.WindowDecoder"),
        ({"sparse": "lfps", "topk": 16}, "mmsink.kv.fast_sparse.SparseDecoder"),
    ],
)
def test_prefill_cache_is_freed_before_decoding(monkeypatch, kv, decoder):
    """Every kv mode's decoder holds its own copy once filled, so the prefill's cache (for int4 its whole
    quantized store) is gone while the tokens are decoded; the tokens stay generate's."""
    import importlib

    mod, name = decoder.rsplit(".", 1)
    alive = fill_cache_alive_at_run(monkeypatch, getattr(importlib.import_module(mod), name))
    model = tiny_llava(layers=2)
    x = inputs()
    mmsink.wrap(model, kv=kv)
    with torch.no_grad():
        ref = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert torch.equal(fast(model, x, 4), ref)
    assert alive == [False]
