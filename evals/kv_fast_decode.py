"""``generate_fast``'s decode step with the sink + window cache against its dense static-buffer step, by
context length (issue 17's "sink + window decode time flat in conversation length", on the fast path).

The model is ``evals.kv_decode``'s (LLaMA-7B attention shapes, ``--layers`` layers, random weights, a
random text prompt of each ``--contexts`` length). Per (context, mode) one ``generate_fast`` call of
``--steps`` tokens; ms per token = the decoder's ``run`` (all decode steps: graph replays on CUDA) timed
between two syncs, divided by its steps. Modes: the plain fast path (dense buffers of context + steps
slots) and ``kv={"window": W, "sinks": 4}`` (buffers of 4 + W + 1 slots, eviction inside the step).

``--check``: first, on a small fp32 model (tiny width, 2 layers, window 16), generate_fast's window mode
against ``model.generate`` with the same mode, token for token, with the graphs / compile settings of
the run (on CUDA the kernels of the two paths differ, so this reports how many tokens agree; the CPU
tests pin equality).

    python -m evals.kv_fast_decode --check --out /tmp/kvf                  # CUDA
    python -m evals.kv_fast_decode --tiny --contexts 256,1024 --steps 8 --window 64 --check --out /tmp/kvf
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mmsink
from evals.kv_decode import build, sync
from mmsink.fast import clear as fast_clear
from mmsink.fast import decode as fastmod


class RunClock:
    """Times every decoder ``run`` (plain and window decoders): (seconds, steps) of the last one."""

    def __init__(self, device):
        self.device, self.last = device, None

    def __enter__(self):
        self.saved = fastmod.FastDecoder.run
        clock = self

        def timed(dec, steps):
            sync(clock.device)
            t0 = time.perf_counter()
            n = clock.saved(dec, steps)
            sync(clock.device)
            clock.last = (time.perf_counter() - t0, n)
            return n

        fastmod.FastDecoder.run = timed
        return self

    def __exit__(self, *exc):
        fastmod.FastDecoder.run = self.saved


def check(device, graphs, compile) -> dict:
    model = build(2, "tiny", device, torch.float32)
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 32000, (2, 96), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[0, :30] = 0  # a left-padded batch of two
    inputs = dict(input_ids=ids, attention_mask=mask)
    mmsink.wrap(model, kv={"window": 16, "sinks": 4})
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        out = mmsink.generate_fast(model, max_new_tokens=40, graphs=graphs, compile=compile, **inputs)
    mmsink.unwrap(model)
    new_ref, new_out = ref[:, ids.shape[1] :], out[:, ids.shape[1] :]
    agree = (new_ref == new_out).float().mean().item() if new_ref.shape == new_out.shape else 0.0
    first = (new_ref != new_out).nonzero()
    return {
        "tokens_equal": bool(torch.equal(ref, out)),
        "fraction_equal": agree,
        "first_difference": first[0].tolist() if len(first) else None,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--width", default="7b")
    ap.add_argument("--tiny", action="store_true", help="= --width tiny, fp32 (CPU smoke run)")
    ap.add_argument("--graphs", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--check", action="store_true", help="window generate_fast == generate, small model")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    width = "tiny" if a.tiny else a.width
    dtype = torch.float32 if a.tiny or device.type == "cpu" else torch.bfloat16
    graphs = {"auto": None, "on": True, "off": False}[a.graphs]
    compile = {"auto": None, "on": True, "off": False}[a.compile]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "width": width}
    meta |= {"layers": a.layers, "steps": a.steps, "window": a.window, "dtype": str(dtype)}
    meta |= {"graphs": a.graphs, "compile": a.compile, "torch": torch.__version__}
    if a.check:
        meta["check"] = check(device, graphs, compile)
        print("check:", meta["check"], flush=True)
    model = build(a.layers, width, device, dtype)
    model.generation_config.eos_token_id = None  # every run decodes all its steps
    modes = {
        "dense (plain fast path)": None,
        f"window {a.window} + 4 sinks": {"window": a.window, "sinks": 4},
    }
    rows = []
    with RunClock(device) as clock:
        for ctx in [int(c) for c in a.contexts.split(",")]:
            g = torch.Generator().manual_seed(ctx)
            ids = torch.randint(1, 32000, (1, ctx), generator=g).to(device)
            for name, kv in modes.items():
                if kv is not None:
                    mmsink.wrap(model, kv=kv)
                ms = []
                for _ in range(2):  # the first call captures / compiles
                    with torch.no_grad():
                        mmsink.generate_fast(
                            model, max_new_tokens=a.steps, graphs=graphs, compile=compile, input_ids=ids
                        )
                    sec, n = clock.last
                    ms.append(1000 * sec / n)
                decs = [d for d in model.__dict__.get(fastmod.STORE, {}).values()]
                slots = decs[-1].k[0].shape[2] if decs else None
                if kv is not None:
                    mmsink.unwrap(model)
                fast_clear(model)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row = {"context": ctx, "mode": name, "ms_per_token": ms[-1], "first_call_ms": ms[0]}
                row["buffer_slots_per_layer"] = slots
                rows.append(row)
                print(row, flush=True)
                write(out, meta, rows)
    return rows


def write(out: Path, meta: dict, rows: list) -> None:
    (out / "kv_fast_decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"{k}: {v}" for k, v in meta.items()] + [
        "",
        "| context | mode | ms / token | first call | slots |",
    ]
    lines.append("|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['mode']} | {r['ms_per_token']:.3f} | {r['first_call_ms']:.3f} | "
            f"{r['buffer_slots_per_layer']} |"
        )
    (out / "kv_fast_decode.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
