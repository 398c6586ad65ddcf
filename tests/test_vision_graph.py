"""The graphed vision tower's plumbing on CPU: a stand-in for the CUDA graph re-runs the captured function
on the static inputs and copies into the captured outputs (what a replay does), so a missing input copy,
a wrong hidden-state pick or a tap hook not re-fired after the replay changes the answer."""

import pytest
import torch
from tiny import batch, next_batch, prompt, tiny_llava, tiny_llava_next

import mmsink
from mmsink.fast import vision_graph


def fake_capture(taps):
    """Replay = run again with the pruner's tap hooks silenced (a CUDA graph does not call them)."""

    def capture(fn):
        out = fn()

        def replay():
            saved = [(m, dict(m._forward_hooks)) for m, _ in taps]
            for m, hook in taps:
                for k in [k for k, h in m._forward_hooks.items() if h is hook]:
                    del m._forward_hooks[k]
            try:
                new = fn()
            finally:
                for m, hooks in saved:
                    m._forward_hooks.clear()
                    m._forward_hooks.update(hooks)
            for o, n in zip(out, new):
                if o is not None:
                    o.copy_(n)

        return out, replay

    return capture


def run(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
    wrapped = "_mmsink" in model.__dict__
    return logits, mmsink.stats(model).kept_indices if wrapped else None


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method", [None, "visionzip"])
def test_graphed_tower_gives_the_eager_answers(family, method):
    if family == "llava":
        model = tiny_llava(layers=4)
        data = [batch([prompt(3, 5)], seed=s) for s in (0, 1)]
    else:
        model = tiny_llava_next(layers=4)
        data = [next_batch(model, [(3, 5, [(40, 56)])], seed=s)[0] for s in (0, 1)]
    if method is not None:
        mmsink.wrap(model, prune=method, budget=0.5)
    eager = [run(model, d) for d in data]
    assert not torch.allclose(eager[0][0], eager[1][0])  # the two inputs must tell a stale replay apart
    handle = mmsink.api.get_handle(model) if method is not None else None
    taps = handle.vision_taps if handle is not None else []
    assert len(taps) == (3 if method == "visionzip" else 0)  # q, k and the feature layer's output ([CLS])
    tower = model.model.vision_tower
    with vision_graph.patched(model, taps, capture=fake_capture(taps)) as g:
        graphed = [run(model, d) for d in data + data[:1]]
    assert "forward" not in tower.__dict__  # the tower's own forward is back
    assert g.captures == 1  # same shapes: one capture, replayed
    for (lg, kept), (le, ke) in zip(graphed, eager + eager[:1]):
        torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-5)
        assert kept == ke
    if taps:  # the same model without the taps (as mmsink.disabled runs it) keeps its own graphs
        with mmsink.disabled(model), vision_graph.patched(model, [], capture=fake_capture([])) as bare:
            run(model, data[0])
        with vision_graph.patched(model, taps, capture=fake_capture(taps)) as again:
            assert again is g and run(model, data[1])[1] == eager[1][1]
        assert g.captures == 1 and bare.captures == 1
