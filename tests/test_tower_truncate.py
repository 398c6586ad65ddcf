"""The graphed vision tower runs the encoder only through the deepest layer the model reads and keeps the
read hidden states alone (issue 20). Graph replays are stood in on the CPU (the captured function runs
again and copies into the captured outputs), in fp32: what the truncated call gives must equal, bit for
bit, what transformers' untruncated tower gives, while the layers past the cut never run."""

import weakref

import pytest
import torch
from test_tower_first import Replays, stood_in
from tiny import IMAGE_TOKEN, batch, clip, finish, llama, next_batch, prompt
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import mmsink
from mmsink.fast import store, vision_graph
from mmsink.tools import bench

DEPTH = 4  # vision layers of the models built here (the shared tiny towers have 2)


def towered(family: str, feature_layer, depth: int = DEPTH):
    """A tiny LLaVA / LLaVA-NeXT whose CLIP tower has ``depth`` layers and reads ``feature_layer``."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    common = dict(vision_feature_layer=feature_layer, vision_feature_select_strategy="default")
    if family == "llava":
        vision = clip(14 * 6)
        vision.num_hidden_layers = depth
        cfg = LlavaConfig(
            vision_config=vision,
            text_config=llama(4),
            image_token_id=IMAGE_TOKEN,
            image_seq_length=36,
            **common,
        )
        cls = LlavaForConditionalGeneration
    else:
        vision = clip(28)
        vision.num_hidden_layers = depth
        cfg = LlavaNextConfig(
            vision_config=vision,
            text_config=llama(4),
            image_token_index=IMAGE_TOKEN,
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
            **common,
        )
        cls = LlavaNextForConditionalGeneration
    torch.manual_seed(0)
    return finish(cls(cfg), "sdpa")


def inputs_for(model, seed: int) -> dict:
    if model.config.model_type == "llava":
        return batch([prompt(3, 5)], seed=seed)
    return next_batch(model, [(3, 5, [(40, 56)])], seed=seed)[0]


def layer_calls(model) -> tuple:
    """(calls per encoder layer, hook handles)."""
    calls = [0] * len(blocks(model))
    handles = [
        m.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, m in enumerate(blocks(model))
    ]
    return calls, handles


def blocks(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def features(model, inputs):
    with torch.no_grad():
        return model.model.get_image_features(**image_args(inputs), return_dict=True).pooler_output


def tower_out(model, pix):
    with torch.no_grad():
        return model.model.vision_tower(pix, output_hidden_states=True, return_dict=True)


def pixels(model, inputs):
    pix = inputs["pixel_values"]
    return pix.flatten(0, 1) if pix.dim() == 5 else pix


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("feature_layer,ran", [(-2, 3), (-3, 2), (1, 1), (0, 1), ([1, -2], 3), (-1, 4)])
def test_truncated_tower_gives_the_eager_hidden_states(family, feature_layer, ran):
    """Two inputs in turn, then the first again (a stale replay would answer for the other): the read
    hidden states and the image features equal the untruncated tower's bitwise; only the first ``ran``
    layers ever run; the last hidden state and the pooled output are None when the cut left layers
    out, the tower's own otherwise."""
    model = towered(family, feature_layer)
    data = [inputs_for(model, s) for s in (0, 1)]
    reads = [feature_layer] if isinstance(feature_layer, int) else feature_layer
    eager, eager_feats = [], []
    for d in data:
        eager.append(tower_out(model, pixels(model, d)))
        eager_feats.append(features(model, d))
    assert not torch.equal(eager[0].hidden_states[reads[0]], eager[1].hidden_states[reads[0]])
    calls, handles = layer_calls(model)
    try:
        with vision_graph.patched(model, [], capture=Replays().capture) as g:
            got = [ends(tower_out(model, pixels(model, d))) for d in data + data[:1]]
            feats = [features(model, d) for d in data]
    finally:
        for h in handles:
            h.remove()
    assert g.captures == 1 and g.cut() == ran
    assert all(c > 0 for c in calls[:ran]) and calls[ran:] == [0] * (DEPTH - ran)
    for (hidden, last, pooled), ref in zip(got, eager + eager[:1]):
        assert len(hidden) == DEPTH + 1
        for i in reads:
            assert torch.equal(hidden[i], ref.hidden_states[i])
        if ran < DEPTH:
            assert last is None and pooled is None
        else:
            assert torch.equal(last, ref.last_hidden_state) and torch.equal(pooled, ref.pooler_output)
    for f, e in zip(feats, eager_feats):
        assert len(f) == len(e) and all(torch.equal(a, b) for a, b in zip(f, e))


def ends(out) -> tuple:
    """(hidden states, last hidden state, pooled output), copied now: the last two are the graph's own
    memory, valid until the next replay."""
    last, pooled = out.last_hidden_state, getattr(out, "pooler_output", None)
    return out.hidden_states, *(None if t is None else t.clone() for t in (last, pooled))


def image_args(inputs) -> dict:
    return {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}


def test_tap_past_the_cut_runs_every_layer():
    """A hook on the last layer (past the cut for feature layer -2) must see that layer's eager output:
    the call then runs every layer and keeps the tower's own last hidden state."""
    model = towered("llava", -2)
    d = inputs_for(model, 0)
    last = blocks(model)[-1]
    seen = []
    taps = [(last, lambda m, a, o: seen.append(o.clone()))]
    ref = tower_out(model, pixels(model, d))
    with vision_graph.patched(model, taps, capture=Replays().capture) as g:
        out = tower_out(model, pixels(model, d))
    assert g.cut() == DEPTH
    assert torch.equal(seen[-1], ref.hidden_states[-1])
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method", ["visionzip", "fastv"])
def test_pruned_model_through_the_truncated_tower(family, method):
    """The wrapped model's logits and kept tokens through the truncated graphed tower equal the eager
    model's bitwise (VisionZip's taps sit in the layer read, inside the cut)."""
    model = towered(family, -2)
    mmsink.wrap(model, prune=method, budget=0.5)
    try:
        data = [inputs_for(model, s) for s in (0, 1)]
        handle = mmsink.api.get_handle(model)
        taps = handle.vision_taps
        assert len(taps) == (3 if method == "visionzip" else 0)

        def run(d):
            with torch.no_grad():
                logits = model(**d).logits
            return logits, mmsink.stats(model).kept_indices

        eager = [run(d) for d in data]
        calls, handles = layer_calls(model)
        try:
            with vision_graph.patched(model, taps, capture=Replays().capture) as g:
                got = [run(d) for d in data + data[:1]]
        finally:
            for h in handles:
                h.remove()
    finally:
        mmsink.unwrap(model)
    assert g.cut() == DEPTH - 1 and calls[-1] == 0 and calls[0] > 0
    for (lg, kg), (le, ke) in zip(got, eager + eager[:1]):
        assert torch.equal(lg, le) and kg == ke


@pytest.mark.parametrize("shape", ["tiny-cpu", "tiny-next-cpu"])
@pytest.mark.parametrize("method", ["fastv", "visionzip"])
def test_generate_fast_tokens_through_the_truncated_tower(monkeypatch, shape, method):
    """generate_fast with the graphs stood in (tower truncated) gives generate's greedy tokens, and the
    tower's last layer never runs in it."""
    model = bench.build(shape)
    model.generation_config.eos_token_id = None
    inputs, n_vis = bench.bench_inputs(model, 1, 5, 4)
    mmsink.wrap(model, prune=method, budget=n_vis // 4)
    try:
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        stood_in(monkeypatch, Replays())
        store.clear(model)
        calls, handles = layer_calls(model)
        try:
            with torch.no_grad():
                got = mmsink.generate_fast(model, max_new_tokens=4, graphs=True, compile=False, **inputs)
        finally:
            for h in handles:
                h.remove()
    finally:
        mmsink.unwrap(model)
        store.clear(model)
    assert torch.equal(got, ref)
    assert calls[-1] == 0 and calls[-2] > 0


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops run inside the mode allocate, while alive: now and the peak (what a
    CUDA graph's private pool must hold for the captured call, up to kernels' internal scratch)."""

    def __init__(self):
        super().__init__()
        self.refs, self.size, self.now, self.peak = {}, {}, 0, 0

    def _drop(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.now -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rets = func._schema.returns
        for j, t in enumerate(pytree.tree_leaves(out)):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.refs:  # a fresh storage (not a view or an in-place result of another)
                if j >= len(rets) or rets[j].alias_info is not None or not t.untyped_storage().nbytes():
                    continue
                self.refs[key], self.size[key] = 0, t.untyped_storage().nbytes()
                self.now += self.size[key]
                self.peak = max(self.peak, self.now)
            self.refs[key] += 1
            weakref.finalize(t, self._drop, key)
        return out


def test_truncated_call_keeps_the_read_hidden_state_alone():
    """Memory of the captured call, counted at the dispatcher: the truncated call ends holding exactly
    the read hidden state (the untruncated one also the last hidden state and the pooled output) and
    peaks lower (the earlier hidden states die as the layers run)."""
    model = towered("llava", -2)
    tower = model.model.vision_tower
    x = pixels(model, inputs_for(model, 0))
    read = tower_out(model, x).hidden_states[-2]
    res = {}
    for name, enc in (("full", None), ("cut", vision_graph.encoder_of(tower))):
        g = vision_graph.GraphedTower((-2,), [], capture=None, encoder=enc)
        g.forward = tower.forward
        with torch.no_grad(), LiveBytes() as m:
            flat = g._run((x,), {"output_hidden_states": True, "return_dict": True})[1]
            res[name] = (m.peak, m.now)
        assert torch.equal(flat[2 + DEPTH - 1], read)
    hs = read.numel() * read.element_size()
    assert res["cut"][1] == hs and res["full"][1] > hs
    assert res["cut"][0] < res["full"][0]
