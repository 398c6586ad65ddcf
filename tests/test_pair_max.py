"""VisPruner's round kernel (``mmsink.core.pair_max``): each picked row's highest entry over the picked
columns, equal to torch's gathers and max (``reference``) bit for bit (a max rounds nothing), and the
reference against a plain loop. Without a GPU the kernel runs in Triton's interpreter (this file run as a
script); with CUDA the ``gpu`` test runs it compiled. Cases: LLaVA's first round (544 residual tokens, 272
against 272), column sets longer than a loop step, row blocks cut short, one row, no row, bf16, rows that
repeat, every entry negative; fp64 left to torch."""

from __future__ import annotations

import pytest
import torch
from triton_run import compile_for_hopper, interpret, on_gpu, print_cases

SEEDS = (0, 1)
LEFT = ("fp64", "no row")  # no launch: torch's path, nothing to compute
CASES = {
    "llava round 1": dict(b=2, r=544, la=272, lb=272),
    "long columns": dict(b=3, r=400, la=37, lb=300),
    "short rows": dict(b=1, r=50, la=17, lb=9),
    "one row": dict(b=2, r=20, la=1, lb=5),
    "no row": dict(b=2, r=20, la=0, lb=5),
    "bf16": dict(b=2, r=130, la=40, lb=65, dtype="bfloat16"),
    "repeats": dict(b=2, r=30, la=25, lb=40, repeat=True),
    "all negative": dict(b=2, r=40, la=10, lb=9, shift=-10.0),  # masked entries must not win
    "fp64": dict(b=2, r=40, la=10, lb=9, dtype="float64"),  # torch's path (the kernel compares in fp32)
}


def inputs(c: dict, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(c["b"], c["r"], c["r"], generator=g) + c.get("shift", 0.0)
    sim = sim.to(getattr(torch, c.get("dtype", "float32")))
    if c.get("repeat"):  # indices drawn with repeats
        a = torch.randint(c["r"], (c["b"], c["la"]), generator=g)
        b = torch.randint(c["r"], (c["b"], c["lb"]), generator=g)
    else:  # disjoint places, as a round's even and odd ones
        perm = torch.stack([torch.randperm(c["r"], generator=g) for _ in range(c["b"])])
        a, b = perm[:, : c["la"]], perm[:, c["la"] : c["la"] + c["lb"]]
    return sim.to(device), a.to(device), b.to(device)


class Counted:
    """A Triton kernel whose launches are counted."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def compare(name: str, seed: int, device="cpu") -> dict:
    from mmsink.core import pair_max as pm

    c = CASES[name]
    sim, a, b = inputs(c, seed, device)
    counted = pm._pair_max = Counted(pm._pair_max)
    try:
        got = pm.pair_max(sim, a, b)
    finally:
        pm._pair_max = counted.kernel
    return dict(
        ran=bool(counted.grids),
        equal=bool(torch.equal(got, pm.reference(sim, a, b))),
        shape=list(got.shape) == [c["b"], c["la"]] and got.dtype == sim.dtype,
    )


@pytest.fixture(scope="module")
def interpreted():
    return interpret(__file__)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_equals_the_reference_interpreted(interpreted, name):
    for seed in SEEDS:
        r = interpreted[(name, seed)]
        assert r["ran"] == (name not in LEFT) and r["equal"] and r["shape"], r


def test_reference_is_the_rule():
    """The reference against a plain loop over rows and columns."""
    from mmsink.core.pair_max import reference

    c = dict(b=2, r=12, la=5, lb=6)
    for seed in SEEDS:
        sim, a, b = inputs(c, seed)
        want = torch.tensor(
            [[max(float(sim[i, x, y]) for y in b[i].tolist()) for x in a[i].tolist()] for i in range(2)]
        )
        assert torch.equal(reference(sim, a, b), want)


def test_kernel_compiles_for_hopper():
    from mmsink.core import pair_max as pm

    ptr = dict(sim_ptr="*fp32", a_ptr="*i64", b_ptr="*i64", out_ptr="*fp32")
    compile_for_hopper([(pm._pair_max, dict(ROWS=pm.ROWS, COLS=pm.COLS), 4)], ptr)


@on_gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_equals_the_reference_cuda(name):
    for seed in SEEDS:
        r = compare(name, seed, "cuda")
        assert r["ran"] == (name not in LEFT) and r["equal"] and r["shape"], r


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1): one JSON line per result
    print_cases(CASES, SEEDS, compare, {})
