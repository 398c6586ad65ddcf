"""VisiPruner's per-layer bookkeeping with fewer ops (issue 20: selection overhead at batch 16), each cut
against the behaviour it replaces: the graphed step copies only the inputs that changed since its last
replay (a changed or new tensor is still copied: never a stale result), the plan's keep mask and read come
out of the same step (as the graph's own tensors, not copies), the shallow stage's output is written in
place and its unread mass left out, and a half-precision factor is promoted by the product instead of
copied first (bit for bit the same)."""

import pytest
import torch
from test_graphed import StandIn
from test_graphed_pdrop_visipruner import inputs_visipruner
from test_grouped import case
from torch.utils._python_dispatch import TorchDispatchMode

from mmsink.core import attention as att
from mmsink.core import graphs
from mmsink.pruners import visipruner


class Copies(TorchDispatchMode):
    """Counts ``copy_`` calls (a graph's input loads)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten.copy_.default
        return func(*args, **(kwargs or {}))


def affine(x, y, z):
    return (x * 2 + y - z,)


def called(g, *args):
    """(the result, the inputs copied): the stand-in's replay writes the one output with a copy too."""
    with Copies() as c:
        out = g(*args)[0]
    return out, c.n - 1


def test_reuse_copies_only_changed_inputs(monkeypatch):
    """Same objects unchanged: no copy; one changed in place (its version moves) or a new object: copied,
    and every result is the function's on the current inputs."""
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)
    g = graphs.Graphed(affine, capture=StandIn(), reuse=True)
    x, y, z = (torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(3))
    assert torch.equal(g(x, y, z)[0], affine(x, y, z)[0])  # the capture
    out, n = called(g, x, y, z)
    assert torch.equal(out, affine(x, y, z)[0]) and n == 0
    x.add_(1.0)  # in place: the same object, a new version
    out, n = called(g, x, y, z)
    assert torch.equal(out, affine(x, y, z)[0]) and n == 1
    y = y + 3.0  # a new object
    out, n = called(g, x, y, z)
    assert torch.equal(out, affine(x, y, z)[0]) and n == 1
    z[2:4].mul_(-1.0)  # through a view: the version counter is shared
    out, n = called(g, x, y, z)
    assert torch.equal(out, affine(x, y, z)[0]) and n == 1


def test_without_reuse_every_input_is_copied(monkeypatch):
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)
    g = graphs.Graphed(affine, capture=StandIn())
    x, y, z = torch.randn(5), torch.randn(5), torch.randn(5)
    g(x, y, z)
    assert called(g, x, y, z)[1] == 3


def test_own_results_are_the_graphs_tensors(monkeypatch):
    """``own`` positions come back as the graph's own tensors (the same object each call, rewritten by the
    next replay), the others as copies; every value is the function's on that call's inputs."""
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)

    def two(x):
        return x + 1, x * 3

    g = graphs.Graphed(two, capture=StandIn(), reuse=True, own=(0,))
    x = torch.randn(5)
    a1, b1 = g(x)
    a1_seen = a1.clone()
    a2, b2 = g(x * 2)
    assert a2 is a1 and b2 is not b1
    assert torch.equal(a2, x * 2 + 1) and torch.equal(b2, x * 6) and torch.equal(b1, x * 3)
    assert torch.equal(a1_seen, x + 1)


def test_reuse_copies_inference_tensors_every_time(monkeypatch):
    """An inference tensor has no version counter: it is copied at every call."""
    monkeypatch.setattr(graphs, "is_cuda", lambda t: True)
    g = graphs.Graphed(affine, capture=StandIn(), reuse=True)
    y, z = torch.randn(5), torch.randn(5)
    with torch.inference_mode():
        x = torch.randn(5)
        g(x, y, z)
        x.add_(1.0)
        out, n = called(g, x, y, z)
    assert torch.equal(out, affine(x, y, z)[0]) and n == 1


@pytest.mark.parametrize("seed", range(3))
def test_observe_decide_is_keep_text_of_observe_step(seed):
    """The step's keep mask over every slot and its read are ``Prefill.keep_text`` of ``observe_step``'s
    visual keep mask and ``testing.any()``, as after_layer made them before (fixed budget and deep stage)."""
    b, n = 4, 23
    q, k, v, prompt, vis, fused, deep, images = inputs_visipruner(seed, b)
    valid = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < 0.7
    vis = vis & valid
    valid = valid | vis
    layer, limits = torch.arange(8)[4], (0.99, 0.2, 0.999, 2)
    for f, im, dp, fb in ((torch.full_like(fused, -1), images, None, 4), (fused, None, deep, None)):
        args = (q, k, v, None, prompt, vis, vis.any(1), f, layer, dp, im, 0.3, limits, fb)
        keep, fused_at, testing, testing_any, new_deep = visipruner.observe_decide(valid, *args)
        keep_vis, want_fused, want_testing, want_deep = visipruner.observe_step(*args)
        assert torch.equal(keep, torch.where(vis, keep_vis, valid))
        assert torch.equal(fused_at, want_fused) and torch.equal(testing, want_testing)
        assert testing_any.dtype == torch.long and int(testing_any) == int(want_testing.any())
        assert (new_deep is None) == (want_deep is None)
        if want_deep is not None:
            assert all(torch.equal(x, y) for x, y in zip(new_deep, want_deep))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_wide_factor_gives_the_float_product(dtype):
    """A float32 mass times ``wide(x)`` is bit for bit the mass times ``x.float()``."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 7, 16, generator=g) * 30).to(dtype)
    m = torch.rand(3, 4, 7, 1, generator=g)
    got = m * visipruner.wide(x)
    assert got.dtype == torch.float32 and torch.equal(got, m * x.float())


@pytest.mark.parametrize("seed", range(3))
def test_in_place_output_and_unread_mass(seed):
    """The shallow stage's attention (fused path: one group skipped): written in place under no_grad, it
    equals the out-of-place write autograd gets; with ``skip_mass=False`` the skipped group's mass is not
    made (None) and a ``mix`` that does not read it gives the same output."""
    q, k, v, valid, rows, groups, _ = case("cpu", torch.float32, seed)
    seen = []

    def mix(outs, masses, ri, vv):
        seen.append(masses[1])
        return masses[0][..., None] * outs[0].float()

    def run(q, k, v, skip_mass=True):
        out = att.reweighted_attention(
            q, k, v, None, valid, 0.125, "sdpa", rows, groups, mix, 1, True, None, skip_mass
        )[0]
        return out.detach()

    with torch.no_grad():
        in_place = run(q, k, v)
        unread = run(q, k, v, skip_mass=False)
    with torch.enable_grad():
        out_of_place = run(*(t.clone().requires_grad_() for t in (q, k, v)))
    assert torch.equal(in_place, out_of_place) and torch.equal(unread, in_place)
    assert seen[0] is not None and seen[1] is None and seen[2] is not None
