"""Memory a ``generate_fast`` decode step leaves held, per step and layer, with autograd on and off: the
LLaVA-1.5-7B layer shape (2 text layers, 1 vision layer, random weights), bf16, on a CPU; a 20-token
prompt and 700 new tokens give the 768-slot buffers of the bench's 641-token prompt.

    python evals/results/fast_path/issue20_targets_2026-12-01/grad_memory_probe.py \
        base,write,matmul,reduce,fuse+write+matmul
    python evals/results/fast_path/issue20_targets_2026-12-01/grad_memory_probe.py \
        base,write,reduce --eager

Held bytes: glibc's heap in use (``mallinfo2``: arena + mmapped) after 4 steps minus before, after 2
warm steps (the compile). Why: ``evals/profile_decode.py`` timed its plain steps with autograd on.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import sys

import torch
from mmsink.evals.profile_decode import options_of

import mmsink
from mmsink.tools import bench


class MallInfo(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def heap(libc) -> int:
    gc.collect()
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(2)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo
    shape = copy.deepcopy(bench.SHAPES["llava-1.5-7b"])
    shape["text"]["num_hidden_layers"] = 2
    shape["vision"]["num_hidden_layers"] = 1
    bench.SHAPES["probe-7b-2l"] = shape
    compile = "--eager" not in argv
    model = bench.build("probe-7b-2l", "cpu", torch.bfloat16)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 30000, (1, 20))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch._dynamo.config.recompile_limit = 64  # grad on and off: a compile each
    for name in argv[0].split(","):
        mmsink.generate_fast(
            model, max_new_tokens=700, graphs=False, compile=compile, step=options_of(name), **inputs
        )
        dec = next(reversed(model.__dict__["_mmsink_decoders"].values()))
        for grad in (False, True):
            dec.t.zero_()
            with torch.set_grad_enabled(grad):
                dec.step()
                dec.step()
            before = heap(libc)
            with torch.set_grad_enabled(grad):
                for _ in range(4):
                    dec.step()
            held = (heap(libc) - before) / 4 / len(dec.layers)
            print(
                f"{name} compile={compile} grad={grad} caps={dec.caps}: held +{held / 1e6:.2f} MB per step "
                "per layer",
                flush=True,
            )
        model.__dict__.pop("_mmsink_decoders", None)


if __name__ == "__main__":
    main()
