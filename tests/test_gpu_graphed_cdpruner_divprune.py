"""On a GPU: CDPruner's and DivPrune's greedy loops replayed as CUDA graphs (``core.graphs.Graphed``, real
captures) keep exactly the eager kept set: the loops alone on batch-16 LLaVA-1.5-sized groups (576 tokens,
64 picks, some groups padded), and the pruners in a tiny fp32 LLaVA with the graph on vs off, several
seeds, one graph per signature and none failed. Skipped without CUDA
(tests/test_graphed_cdpruner_divprune.py checks the wiring on the CPU with a stand-in capture)."""

import pytest
import torch
from tiny import batch, prompt, tiny_llava

import mmsink
from mmsink.core import graphs
from mmsink.pruners.cdpruner import dpp_greedy
from mmsink.pruners.divprune import divprune_greedy, divprune_select

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
DEVICE = "cuda"


def groups(seed: int, dtype, g: int = 16, n: int = 576, d: int = 128):
    """Tokens [g, n, d] (a few groups padded: ``real`` [g, n]) and a relevance-weighted DPP kernel."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    x = torch.randn(g, n, d, device=DEVICE, generator=gen)
    sizes = torch.full((g,), n, device=DEVICE)
    sizes[::5] = n - 100 * (seed + 1)
    real = torch.arange(n, device=DEVICE)[None] < sizes[:, None]
    unit = x / x.norm(dim=-1, keepdim=True)
    rel = torch.rand(g, n, device=DEVICE, generator=gen) * real
    kernel = rel[:, :, None] * (unit @ unit.transpose(1, 2)) * rel[:, None, :]
    return x.to(dtype), real, kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loops_graphed_equal_eager(dtype):
    div, dpp = graphs.Graphed(divprune_greedy), graphs.Graphed(dpp_greedy)
    seen = []
    for seed in range(4):
        x, real, kernel = groups(seed, dtype)
        got = divprune_select(x, real, 64, div)[0]
        assert torch.equal(got, divprune_select(x, real, 64)[0]), seed
        picks = dpp(kernel, real, 64)
        assert torch.equal(picks, dpp_greedy(kernel, real, 64)), seed
        seen.append(picks)
    for g in (div, dpp):
        assert len(g.graphs) == 1 and not g.failed
    assert not torch.equal(seen[0], seen[1])  # copies of each call's result, not the graph's own outputs


def on_device(inputs: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


CASES = [
    ("divprune", {"budget": 6}),
    ("divprune", {"budget": 0.2}),
    ("cdpruner", {"budget": 6, "relevance": "embeds"}),
    ("cdpruner", {"budget": 0.2, "relevance": "none"}),
]
PROMPTS = [prompt(5, 7, seed=1), prompt(2, 4, seed=2, images=2), prompt(3, 6, seed=4)]


@pytest.mark.parametrize("method,opts", CASES)
def test_pruners_graphed_keep_the_eager_set(method, opts, monkeypatch):
    model = tiny_llava(layers=2).to(DEVICE)  # fp32: the graph and eager kernels are the same ones
    mmsink.wrap(model, prune=method, **opts)
    try:
        greedy = mmsink.api.get_handle(model).pruner.greedy
        sets = []
        for seed in range(4):
            inputs = on_device(batch(PROMPTS, seed=seed))
            with torch.no_grad():
                model(**inputs)
                graphed = mmsink.stats(model).kept_indices[-1]
                with monkeypatch.context() as m:
                    m.setattr(graphs, "on_cuda", lambda x: False)  # the same Graphed, eager
                    model(**inputs)
                eager = mmsink.stats(model).kept_indices[-1]
            assert graphed == eager, seed
            sets.append(graphed)
    finally:
        mmsink.unwrap(model)
    assert len(greedy.graphs) == 1 and not greedy.failed
    assert len({str(s) for s in sets}) > 1  # the seeds select differently
