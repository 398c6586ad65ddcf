"""``generate_fast`` launches LLaVA-NeXT's graphed vision tower before the forward (issue 20): the tower's
input as the family builds it must be the model's own, the tower's call in the forward must take that
launch's outputs (one replay a prefill, answers of the right image), and the layout read from the host
copies of ids and mask queued before the tower must be the layout read from the device. Graph replays
stood in on the CPU (the function runs again and copies into the captured outputs)."""

import pytest
import torch
from mmsink.patches import family_for
from tiny import next_batch, tiny_llava_next

import mmsink
from mmsink.core import layout as layout_mod
from mmsink.fast import store, vision_graph


@pytest.fixture(scope="module")
def model():
    m = tiny_llava_next(layers=4)
    m.generation_config.eos_token_id = None
    return m


def tower_inputs(model, inputs) -> list:
    """The tensors transformers hands the vision tower in one forward."""
    seen = []
    h = model.model.vision_tower.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return seen


@pytest.mark.parametrize(
    "specs",
    [
        [(3, 5, [(56, 56)])],  # every tile used
        [(3, 5, [(28, 56)])],  # fewer tiles than the pixel tensor holds
        [(3, 5, [(40, 56), (56, 13)]), (2, 4, [(56, 56)])],  # several images, two prompts
    ],
)
def test_tower_input_is_the_models_own(model, specs):
    inputs = next_batch(model, specs, seed=2)[0]
    want = tower_inputs(model, inputs)
    got = family_for(model).tower_input(dict(inputs))
    assert len(want) == 1 and got.shape == want[0].shape and torch.equal(got, want[0])


def test_tower_input_refuses_other_forms(model):
    fam = family_for(model)
    pix = torch.zeros(2, 3, 28, 28)
    assert fam.tower_input({"pixel_values": pix, "image_sizes": [(28, 28)]}) is None  # 4-D: no tiles
    assert fam.tower_input({"pixel_values": None}) is None


class Replays:
    """Stand-in captures that count replays and who asked for them (the launch or the tower's call)."""

    def __init__(self):
        self.log = []

    def capture(self, fn):
        out = fn()

        def replay():
            self.log.append("replay")
            new = fn()
            for o, n in zip(out, new) if isinstance(out, (list, tuple)) else [(out, new)]:
                if o is not None:
                    o.copy_(n)

        return out, replay


def stood_in(monkeypatch, replays):
    monkeypatch.setattr(vision_graph, "usable", lambda model, **kw: True)
    real = vision_graph.patched
    monkeypatch.setattr(
        vision_graph, "patched", lambda m, taps, **kw: real(m, taps, capture=replays.capture, **kw)
    )
    launch = logged(vision_graph.GraphedTower.launch, replays)
    monkeypatch.setattr(vision_graph.GraphedTower, "launch", launch)
    from mmsink.fast import decode

    monkeypatch.setattr(decode, "capture_graph", Replays().capture)  # the tail's, logged apart


def logged(launch, replays):
    def run(self, x, key):
        replays.log.append("launch")
        return launch(self, x, key)

    return run


@pytest.mark.parametrize("method", ["none", "visionzip", "fastv", "dart", "visipruner"])
def test_launched_tower_gives_the_eager_tokens(model, monkeypatch, method):
    """Two images in turn (then the first again): each prefill launches the tower once (from its second
    on: the first captures), the tower's call replays nothing more, and the tokens are those of the eager
    path (no graphs) for that image: a stale or wrong launch would answer for the other image."""
    data = [next_batch(model, [(3, 5, [(56, 56)])], seed=s)[0] for s in (0, 1)]
    mmsink.wrap(model, prune=method, **({} if method == "none" else {"budget": 8}))
    try:
        with torch.no_grad():
            eager = [mmsink.generate_fast(model, max_new_tokens=4, graphs=False, **d) for d in data]
        assert not torch.equal(eager[0], eager[1])
        replays = Replays()
        stood_in(monkeypatch, replays)
        store.clear(model)
        got, logs = [], []
        with torch.no_grad():
            for d in data + data[:1]:
                replays.log.clear()
                got.append(mmsink.generate_fast(model, max_new_tokens=4, graphs=True, compile=False, **d))
                logs.append(list(replays.log))
    finally:
        mmsink.unwrap(model)
        store.clear(model)
    for g, e in zip(got, eager + eager[:1]):
        assert torch.equal(g, e)
    assert logs[0][:1] == ["replay"]  # captured in the forward (its warm-up ran eagerly), then replayed
    for log in logs[1:]:
        assert log[:2] == ["launch", "replay"] and log.count("replay") >= 1
        tower = [e for e in log[:3] if e == "replay"]
        assert len(tower) == 1  # the tower's call took the launch's replay


def layouts_equal(a, b) -> None:
    for f in ("is_image", "image_of", "valid", "anchor", "counts"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f
    for f in ("sizes", "lengths", "anchors", "first_image", "prompt_images", "grids"):
        assert getattr(a, f) == getattr(b, f), f


@pytest.mark.parametrize("images", [1, 3, 10])  # 10 > FIRST_GUESS: the second read
@pytest.mark.parametrize("prompt_len", [None, 30])
def test_layout_from_host_copies_equals_the_device_one(images, prompt_len):
    g = torch.Generator().manual_seed(images)
    rows = []
    for b in range(3):
        ids = [1] + torch.randint(3, 90, (4,), generator=g).tolist()
        for _ in range(images - b % 2):
            ids += [99] * int(torch.randint(1, 4, (1,), generator=g)) + [5]
        rows.append(ids)
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    want = layout_mod.build_layout(ids, mask, 99, None, prompt_len)
    token = layout_mod.EARLY.set(layout_mod.host_copy(ids, mask))
    try:
        got = layout_mod.build_layout(ids, mask, 99, None, prompt_len)
    finally:
        layout_mod.EARLY.reset(token)
    layouts_equal(got, want)


def test_layout_reads_the_host_copy_of_these_ids_only():
    """The host copy is what is read (a copy that differs shows in the sizes), and only for the very ids
    and mask it was made from."""
    ids = torch.tensor([[1, 99, 99, 99, 5]])
    mask = torch.ones_like(ids)
    copy = layout_mod.host_copy(ids, mask)
    copy.host_ids = torch.tensor([[1, 99, 5, 5, 5]])
    token = layout_mod.EARLY.set(copy)
    try:
        assert layout_mod.build_layout(ids, mask, 99, None, None).sizes == [[1]]
        assert layout_mod.build_layout(ids.clone(), mask, 99, None, None).sizes == [[3]]
        assert layout_mod.build_layout(ids, None, 99, None, None).sizes == [[3]]
    finally:
        layout_mod.EARLY.reset(token)
