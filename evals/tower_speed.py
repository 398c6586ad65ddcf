"""Vision tower speed (issue 20): CLIP-L/336 as CUDA graph replays, whole vs truncated vs truncated with
compiled layers, and Qwen2-VL's tower eager vs compiled blocks.

CLIP (LLaVA-NeXT-7B: 5 tiles of 336 px an image; LLaVA-1.5-7B: 1; batches of ``--batches`` images), the
tower built from ``mmsink.tools.bench.build``'s config (random weights: speed does not depend on them), each
row a ``mmsink.fast.vision_graph.GraphedTower`` called as ``generate_fast`` calls it (input copy, replay,
copies of the read hidden state):

- ``full``: every layer, all hidden states from ``output_hidden_states`` (the tower as it was graphed
  before the truncation);
- ``truncated``: the layers through the deepest one read (LLaVA reads ``hidden_states[-2]``: 23 of 24),
  the read hidden state taken by a hook (what ``generate_fast`` runs now);
- ``compiled``: ``truncated`` with each encoder layer through ``torch.compile`` (``layer.compile()``, the
  layers sharing one compiled function; ``--dynamic``: dynamic shapes).

The graphs are replayed in turn, one call of each per rep (alternated), timed with CUDA events; medians
and quartiles over ``--reps``. Per row also: the first call's seconds (warm-up + capture, and the compile
for ``compiled``), the memory the capture peaked at and the memory the graph keeps (CUDA), and the max abs
difference of the read hidden state against the eager untruncated tower's.

Qwen2-VL-7B's tower (``SHAPES['qwen2-vl-7b']``: one image of 100x100 patches) builds its attention layout
on the host and is not graphed: eager against a copy whose blocks go through ``torch.compile``, alternated,
CUDA events around the call; the difference is on the merged output (what the LM reads).

GPU: ``python -m evals.tower_speed --out $OUT/tower_speed`` (its time goes mostly to compiling: the CLIP
layer once per new input shape, the Qwen blocks once). ``--tiny``: the CPU tiny shapes (tiny-next-cpu,
tiny-cpu, tiny-qwen-cpu) with graph replays stood in by re-running the captured function and
perf_counter in place of CUDA events (checks the command, not speed). Results are rewritten after each
part; parts not started by ``--skip-after`` seconds are listed as skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from mmsink.core import graphs
from mmsink.fast import vision_graph
from mmsink.tools import bench

CLIP_PARTS = [("llava-next-7b", 5), ("llava-1.5-7b", 1)]  # (shape, tiles an image)
TINY = {"llava-next-7b": "tiny-next-cpu", "llava-1.5-7b": "tiny-cpu", "qwen2-vl-7b": "tiny-qwen-cpu"}


def say(msg: str) -> None:
    print(f"[tower_speed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stand_in(fn):
    """A CUDA graph's stand-in on the CPU: a replay re-runs ``fn`` and copies into the first outputs."""
    out = fn()

    def replay():
        for o, n in zip(out, fn()):
            if o is not None:
                o.copy_(n)

    return out, replay


class Clock:
    """CUDA events on the GPU, perf_counter on the CPU; ``ms()`` after ``done()``."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks = []

    def time(self, fn):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            self.marks.append((a, b))
        else:
            t = time.perf_counter()
            out = fn()
            self.marks.append(time.perf_counter() - t)
        return out

    def ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.marks]
        return [s * 1e3 for s in self.marks]


def summary(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "q1_ms": q[0], "q3_ms": q[2], "reps": len(ms)}


def limit_recompiles(n: int = 64) -> None:
    """Room for the few shapes timed here (each layer shares one compiled function per shape)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, n)


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def clip_tower(shape: str, device, dtype, args):
    """(tower, a copy whose encoder layers go through torch.compile, the hidden-state indices the model
    reads) of ``shape``'s LLaVA, built alone at real size."""
    meta = bench.build(shape, device="meta")
    vcfg = copy.deepcopy(meta.config.vision_config)
    vcfg._attn_implementation = "sdpa"
    with torch.device(device):
        tower = type(meta.model.vision_tower)(vcfg).to(dtype).eval()
    compiled = copy.deepcopy(tower)
    for b in vision_graph.encoder_of(compiled).layers:  # compiled at the first call, one function shared
        b.compile(backend=args.backend, dynamic=True if args.dynamic else None)
    layer = meta.config.vision_feature_layer
    return tower, compiled, (layer,) if isinstance(layer, int) else tuple(layer)


def graphed(tower, layers, truncate: bool, capture):
    g = vision_graph.GraphedTower(layers, [], capture, vision_graph.encoder_of(tower) if truncate else None)
    g.forward = tower.forward
    return g


def first_call(g, x, cuda: bool) -> dict:
    """Capture (warm-up + capture; the compile for compiled layers): seconds, peak and kept memory."""
    sync(cuda)
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = g(x, output_hidden_states=True, return_dict=True)
    sync(cuda)
    row = {"first_call_s": time.perf_counter() - t}
    del out
    if cuda:
        row["capture_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["graph_keeps_mb"] = (torch.cuda.memory_allocated() - base) / 2**20
    return row


def clip_part(tower, compiled, layers, tiles: int, cuda: bool, args) -> dict:
    """Rows full / truncated / compiled for one batch of ``tiles`` tower inputs."""
    dev, dtype = next(tower.parameters()).device, next(tower.parameters()).dtype
    size = tower.config.image_size
    x = torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(tiles)).to(dev, dtype)
    read = layers[-1]
    with torch.no_grad():
        ref = tower(x, output_hidden_states=True, return_dict=True).hidden_states[read].float()
    capture = graphs.capture if cuda else stand_in
    rows, calls = {}, {}
    with torch.no_grad():
        for name, m in (("full", tower), ("truncated", tower), ("compiled", compiled)):
            g = graphed(m, layers, name != "full", capture)
            before = unique_graphs()
            try:
                r = rows[name] = first_call(g, x, cuda)
            except Exception as e:  # a compiler failure costs its row, not the run
                rows[name] = {"error": failure(e)}
                say(f"  {name}: failed: {rows[name]['error']}")
                continue
            r["new_dynamo_graphs"] = unique_graphs() - before
            r["layers_run"] = g.cut() if g.encoder is not None else len(vision_graph.encoder_of(m).layers)
            got = g(x, output_hidden_states=True, return_dict=True).hidden_states[read]
            r["max_abs_diff_vs_eager"] = (got.float() - ref).abs().max().item()
            calls[name] = g
            say(
                f"  {name}: {r['layers_run']} layers, first call {r['first_call_s']:.1f} s "
                f"({r['new_dynamo_graphs']} new dynamo graphs), diff {r['max_abs_diff_vs_eager']:.3g}"
            )
        compile_seconds(rows, "truncated")
        clock = {n: Clock(cuda) for n in calls}
        for _ in range(args.reps):
            for n, g in calls.items():
                clock[n].time(lambda g=g: g(x, output_hidden_states=True, return_dict=True))
            sync(cuda)
    for n in calls:
        rows[n].update(summary(clock[n].ms()))
    return rows


def qwen_part(shape: str, device, dtype, cuda: bool, args) -> dict:
    meta = bench.build(shape, device="meta")
    vcfg = copy.deepcopy(meta.config.vision_config)
    vcfg._attn_implementation = "sdpa"
    with torch.device(device):
        visual = type(meta.model.visual)(vcfg)
    visual = visual.to(dtype).eval()
    h, w = bench.SHAPES[shape]["grid"]
    dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(h * w, dim, generator=g).to(device, dtype)
    grid = torch.tensor([[1, h, w]], device=device)
    compiled = copy.deepcopy(visual)
    before = unique_graphs()
    for b in compiled.blocks:
        b.compile(backend=args.backend, dynamic=True if args.dynamic else None)
    rows = {}
    with torch.no_grad():
        outs = {}
        models = {"eager": visual, "compiled": compiled}
        for name, m in list(models.items()):
            sync(cuda)
            t = time.perf_counter()
            try:
                outs[name] = m(pix, grid_thw=grid).pooler_output.float()
            except Exception as e:  # a compiler failure costs its row, not the run
                rows[name] = {"error": failure(e)}
                say(f"  qwen {name}: failed: {rows[name]['error']}")
                del models[name]
                continue
            sync(cuda)
            rows[name] = {"first_call_s": time.perf_counter() - t}
            say(f"  qwen {name}: first call {rows[name]['first_call_s']:.1f} s")
        rows["eager"]["max_abs_diff_vs_eager"] = 0.0
        if "compiled" in models:
            rows["compiled"]["new_dynamo_graphs"] = unique_graphs() - before
            rows["compiled"]["max_abs_diff_vs_eager"] = (outs["compiled"] - outs["eager"]).abs().max().item()
        compile_seconds(rows, "eager")
        clock = {n: Clock(cuda) for n in models}
        for _ in range(args.reps):
            for n, m in models.items():
                clock[n].time(lambda m=m: m(pix, grid_thw=grid))
            sync(cuda)
    for n in models:
        rows[n].update(summary(clock[n].ms()))
    return {"grid": [h, w], "patches": h * w, "rows": rows}


def compile_seconds(rows: dict, plain: str) -> None:
    """The compiled row's first call less the same call's without compiling: the compile's seconds."""
    a, b = rows.get("compiled", {}), rows.get(plain, {})
    if "first_call_s" in a and "first_call_s" in b:
        a["compile_s"] = a["first_call_s"] - b["first_call_s"]


def ms(row: dict) -> str:
    return f"{row['median_ms']:.2f} ms" if "median_ms" in row else "failed"


def failure(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def machine(cuda: bool) -> str:
    if cuda:
        return f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    return f"CPU, {os.cpu_count()} cores, shared with other jobs"


def markdown(blob: dict) -> str:
    lines = [
        "# Vision tower speed (issue 20)",
        "",
        f"Command: `{blob['command']}`  ",
        f"Machine: {blob['machine']}  ",
        f"Versions: torch {blob['torch']}, transformers {blob['transformers']}, Python {blob['python']}  ",
        f"Timing: {blob['timing']}; {blob['reps']} reps, alternated; elapsed {blob['elapsed_s']:.0f} s",
        "",
        "First call: warm-up + capture (and, for compiled, the compile: the JSON's compile_s is that row's "
        "first call less the truncated one's).",
        "",
        "| shape | images | tower inputs | row | layers run | median ms | q1-q3 ms | vs full | first call s "
        "| capture peak MB | graph keeps MB | max abs diff vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for part in blob["clip"]:
        full = part["rows"]["full"].get("median_ms", float("nan"))
        for name, r in part["rows"].items():
            if "error" in r:
                head = f"| {part['shape']} | {part['batch']} | {part['tiles']} | {name}"
                lines.append(f"{head} | failed: {r['error']} |")
                continue
            lines.append(
                f"| {part['shape']} | {part['batch']} | {part['tiles']} | {name} | {r['layers_run']} "
                f"| {r['median_ms']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} | {full / r['median_ms']:.2f}x "
                f"| {r['first_call_s']:.1f} | {fmt(r.get('capture_peak_mb'), '.0f')} "
                f"| {fmt(r.get('graph_keeps_mb'), '.0f')} | {r['max_abs_diff_vs_eager']:.3g} |"
            )
    q = blob.get("qwen")
    if q:
        lines += [
            "",
            f"Qwen2-VL tower ({q['shape']}, one image of {q['grid'][0]}x{q['grid'][1]} patches), "
            "not graphed; the difference is on the merged output:",
            "",
            "| row | median ms | q1-q3 ms | vs eager | first call s (compiled: with the compile) "
            "| max abs diff vs eager |",
            "|---|---|---|---|---|---|",
        ]
        base = q["rows"]["eager"]["median_ms"]
        for name, r in q["rows"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error']} |")
                continue
            lines.append(
                f"| {name} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} "
                f"| {base / r['median_ms']:.2f}x | {r['first_call_s']:.1f} "
                f"| {r['max_abs_diff_vs_eager']:.3g} |"
            )
    if blob["skipped"]:
        lines += ["", "Skipped (past --skip-after): " + ", ".join(blob["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU tiny shapes (checks the command, not speed)")
    p.add_argument("--batches", default="1,8", help="images per batch, comma-separated (default 1,8)")
    p.add_argument("--reps", type=int, default=None, help="timed reps (default 30 on the GPU, 3 with --tiny)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes from the start")
    p.add_argument("--no-qwen", action="store_true", help="leave Qwen2-VL's tower out")
    p.add_argument("--skip-after", type=float, default=100.0, help="start no part after this many seconds")
    p.add_argument("--out", default="evals/results/tower_speed")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches: comma-separated integers, got {args.batches!r}")
    if any(b < 1 for b in batches) or args.reps is not None and args.reps < 1:
        p.error("--batches and --reps must be positive")
    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        p.error("no CUDA device: run with --tiny for the CPU check")
    args.reps = args.reps or (3 if args.tiny else 30)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    limit_recompiles()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    blob = {
        "command": "python -m evals.tower_speed " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(cuda),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "timing": "CUDA events around each call" if cuda else "perf_counter, replays stood in (CPU)",
        "reps": args.reps,
        "clip": [],
        "qwen": None,
        "skipped": [],
        "elapsed_s": 0.0,
    }

    def write():
        blob["elapsed_s"] = time.perf_counter() - start
        (out / "tower_speed.json").write_text(json.dumps(blob, indent=1))
        (out / "tower_speed.md").write_text(markdown(blob))

    towers = {}
    for shape, per in CLIP_PARTS:
        name = TINY[shape] if args.tiny else shape
        for b in batches:
            label = f"{name} batch {b}"
            if time.perf_counter() - start > args.skip_after:
                blob["skipped"].append(label)
                continue
            cfg = json.dumps(bench.SHAPES[name]["vision"], sort_keys=True)
            if cfg not in towers:  # LLaVA-1.5 and NeXT share CLIP-L/336: one tower, one compile cache
                towers[cfg] = clip_tower(name, device, dtype, args)
            say(f"{label}: {b * per} tower inputs")
            rows = clip_part(*towers[cfg], b * per, cuda, args)
            blob["clip"].append({"shape": name, "batch": b, "tiles": b * per, "rows": rows})
            write()
            say(f"{label}: " + ", ".join(f"{n} {ms(r)}" for n, r in rows.items()))
    if not args.no_qwen:
        name = TINY["qwen2-vl-7b"] if args.tiny else "qwen2-vl-7b"
        if time.perf_counter() - start > args.skip_after:
            blob["skipped"].append(name)
        else:
            say(f"{name}: tower eager vs compiled blocks")
            blob["qwen"] = dict(shape=name, **qwen_part(name, device, dtype, cuda, args))
            rows = blob["qwen"]["rows"]
            say(f"{name}: " + ", ".join(f"{n} {ms(r)}" for n, r in rows.items()))
    write()
    say(f"done in {blob['elapsed_s']:.0f} s: {out / 'tower_speed.md'}")


if __name__ == "__main__":
    main()
