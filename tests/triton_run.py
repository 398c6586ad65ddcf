"""What the Triton kernel tests share (tests/test_lfps_triton.py, tests/test_decode_kernel.py,
tests/test_gemv.py, tests/test_received_kernel.py): a test file run as a script under Triton's interpreter,
the script's loop over cases and seeds, a compile of kernels for sm_90 (PTX and ptxas, bundled with Triton:
what the interpreter does not type-check), and the marks of their GPU tests."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def on_gpu(test):
    """A kernel's GPU test: marked ``gpu``, skipped without CUDA or without Triton."""
    import torch

    test = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")(test)
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test)
    return pytest.mark.gpu(test)


def interpret(script: str) -> dict:
    """``script`` (a test file) run under ``TRITON_INTERPRET=1`` in a subprocess (the variable is read when
    the kernels are defined): its JSON lines by (case, seed)."""
    pytest.importorskip("triton")
    # this checkout first; the caller's path after it (e.g. what maps a worktree's folders over an editable
    # install's)
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    run = subprocess.run(
        [sys.executable, script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if run.returncode and "only 0-dimensional arrays can be converted" in run.stderr:
        import triton  # an older interpreter keeps runtime ints as 1-element arrays: numpy 2 refuses int()

        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels under this numpy")
    assert run.returncode == 0, run.stderr[-3000:]
    return {(r["case"], r["seed"]): r for r in map(json.loads, run.stdout.splitlines())}


def print_cases(cases, seeds, compare, extra: dict) -> None:
    """The script side of ``interpret``: one JSON line per case and seed, then each of ``extra``'s (name:
    a function of no arguments returning a dict) as seed 0."""
    import torch

    torch.set_num_threads(2)
    for name in cases:
        for seed in seeds:
            print(json.dumps(dict(case=name, seed=seed, **compare(name, seed))), flush=True)
    for name, fn in extra.items():
        print(json.dumps(dict(case=name, seed=0, **fn())), flush=True)


def compile_for_hopper(kernels, ptr: dict, divisible=()):
    """Each (kernel, constexprs, warps) or (kernel, constexprs, warps, options: e.g. num_stages) compiled
    for sm_90; arguments named in ``ptr`` get that type, the rest i32; those in ``divisible`` are marked
    multiples of 16 (pointers 16-byte aligned), as a launch on such values specializes them. Returns the
    compiled kernels."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels defined for the interpreter")
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = []
    for fn, consts, warps, *more in kernels:
        sig = {n: "constexpr" if n in consts else ptr.get(n, "i32") for n in fn.arg_names}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
        src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
        options = dict(num_warps=warps, **(more[0] if more else {}))
        kernel = triton_compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert kernel.asm["cubin"], fn
        out.append(kernel)
    return out
