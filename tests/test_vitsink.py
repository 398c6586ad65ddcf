"""ViT-sink forwarding: detection, protection from every pruner, sink-to-front placement, batching."""

import pytest
import torch
from tiny import batch, pixels_of, prompt, tiny_llava

import mmsink
from mmsink.sinks.vitsink import SinkForwardConfig, detect, to_front_order

SINKS = {"factor": 1.01, "max_sinks": 3}  # the tiny ViT has no real sinks: take each image's top-3 norms


def test_detect_rules():
    a = torch.full((10,), 2.0)
    a[3] = 100.0
    b = torch.full((10,), 2.0)
    b[[2, 7]] = 80.0
    assert detect(a, SinkForwardConfig(), None).nonzero().flatten().tolist() == [3]  # > 3 x median
    assert detect(b, SinkForwardConfig(), None).nonzero().flatten().tolist() == [2, 7]
    assert detect(b, SinkForwardConfig(), 90.0).sum().item() == 0  # absolute threshold
    assert detect(a, SinkForwardConfig(), 90.0).nonzero().flatten().tolist() == [3]
    assert detect(b, SinkForwardConfig(max_sinks=1), None).sum().item() == 1
    assert to_front_order(detect(b, SinkForwardConfig(), None)).tolist()[:3] == [2, 7, 0]


def projector_norms(model, inputs):
    seen = []
    h = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].norm(dim=-1))
    )
    with torch.no_grad():
        model(**inputs)
    h.remove()
    return seen[0]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=8)


def test_sinks_survive_every_pruner(model):
    p = prompt(5, 7, seed=1)
    inputs = batch([p], seed=1)
    norms = projector_norms(model, inputs)[0]
    first = p.index(100)
    expected = sorted(first + j for j in norms.topk(3).indices.tolist())
    for method, opts in [
        ("fastv", {"budget": 2}),
        ("pdrop", {}),
        ("dart", {"budget": 4}),
        ("random", {"budget": 2}),
        ("pool", {"budget": 4}),
        ("visionzip", {"budget": 4}),
        ("visipruner", {"budget": 2}),
    ]:
        mmsink.wrap(model, prune=method, sink_forward=SINKS, **opts)
        with torch.no_grad():
            model(**inputs)
        st = mmsink.stats(model)
        assert sorted(s["position"] for s in st.extra["vit_sinks"][0]) == expected
        for layer in st.kept_indices:
            assert set(expected) <= set(layer[0]), method
    mmsink.unwrap(model)


def test_to_front_moves_sinks_first(model):
    p = prompt(5, 7, seed=2)
    inputs = batch([p], seed=2)
    norms = projector_norms(model, inputs)[0]
    top = sorted(norms.topk(3).indices.tolist())
    first = p.index(100)
    layer0 = model.model.language_model.layers[0]
    seen = []

    def grab(m, a, k):
        seen.append(a[0].clone())

    with torch.no_grad():
        h = layer0.register_forward_pre_hook(grab, with_kwargs=True)
        model(**inputs)
        h.remove()
        mmsink.wrap(model, sink_forward=dict(SINKS, to_front=True))
        h = layer0.register_forward_pre_hook(grab, with_kwargs=True)  # runs after mmsink's hook
        model(**inputs)
        h.remove()
    st = mmsink.stats(model)
    mmsink.unwrap(model)
    bare, moved = seen[0][0, first : first + 36], seen[1][0, first : first + 36]
    order = top + [j for j in range(36) if j not in top]
    assert torch.equal(moved, bare[order])
    assert [s["position"] for s in st.extra["vit_sinks"][0]] == [first, first + 1, first + 2]
    assert [s["patch"] for s in st.extra["vit_sinks"][0]] == top
    assert torch.equal(seen[0][0, :first], seen[1][0, :first])


def test_batched_and_cached(model):
    prompts = [prompt(5, 7, seed=1), prompt(2, 4, seed=2, images=2)]
    inputs = batch(prompts, seed=5)
    mmsink.wrap(model, prune="fastv", budget=4, sink_forward=dict(SINKS, to_front=True))
    try:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
            for i, pr in enumerate(prompts):
                one = {
                    "input_ids": torch.tensor([pr]),
                    "attention_mask": torch.ones(1, len(pr), dtype=torch.long),
                    "pixel_values": pixels_of(inputs, prompts, i),
                }
                torch.testing.assert_close(out[i], model(**one).logits[0, -1], atol=1e-4, rtol=1e-4)
            a = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            b = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad,msg",
    [({"threshold": -1}, "threshold"), ({"factor": 0.5}, "factor"), ({"max_sinks": 0}, "max_sinks")],
)
def test_bad_settings(model, bad, msg):
    with pytest.raises(ValueError, match=msg):
        mmsink.wrap(model, sink_forward=bad)
    with pytest.raises(ValueError, match="sink_forward must be"):
        mmsink.wrap(model, sink_forward="yes")
