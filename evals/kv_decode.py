"""Decode cost of the KV-cache modes at long context (issue 17): dense, sink + window, int4 (KVSink) and
LFPS. A LLaVA whose language model has LLaMA-7B's attention shapes (hidden 4096, 32 heads of 128, MLP
11008) but ``--layers`` layers and random weights (the cost per layer is what differs between modes);
a text prompt of each ``--contexts`` length, then ``--steps`` greedy tokens through ``model.generate``.

Per (context, mode): decode ms per token, the median of the decode steps' wall times (a stopping
criterion that never stops timestamps every token; the prefill ends before its first call), the first
and last steps, KV bytes held after the run, peak memory; with ``--profile`` a second, shorter run under
torch.profiler (op table of its decode steps, by time and by bytes allocated) into ``profiles.txt``.
Dense runs three ways: transformers' default ``DynamicCache`` (torch.cat of the whole cache per step, a
new key length per step), the same with SDPA's cuDNN backend left out, and a ``StaticCache`` (buffers of
max_length slots written in place: the fair baseline). Separately, one layer's decode attention alone
at each context (``attention_only``): SDPA over every key against LFPS's step (top-512, a history of
random slots) as ``generate`` and ``generate_fast`` call it, eager, as CUDA-graph replays, compiled and
as ``mmsink.kv.lfps_triton``'s two kernels (CUDA rows only; a CPU run skips them), with each call's aten
ops and estimated bytes (``evals/op_cost.py``), the issue's ">= 3x faster attention at 32k" goal; and
SDPA per backend when the key length changes at every call.

    python -m evals.kv_decode --profile --out /tmp/kvd      # CUDA, ~2 min per context
    python -m evals.kv_decode --attention-only --contexts 8192,32768 --out /tmp/kva   # attention alone
    python -m evals.kv_decode --tiny --contexts 256 --steps 4 --out /tmp/kvd   # CPU smoke run

The JSON and table are rewritten after every row, so a run cut by a time limit keeps what it measured.
On the H200 (no network, no optimum-quanto): ``bash evals/results/kv_decode/run.sh``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

import mmsink

# mode -> (kv= of mmsink.wrap or None for the plain model, extra generate() arguments)
MODES = {
    "dense": (None, {}),
    # the fair dense baseline: keys written in place into buffers allocated once, no per-step torch.cat
    # (transformers' StaticCache of max_length slots; its auto-compile off: every mode runs eager)
    "dense, static cache": (None, {"cache_implementation": "static", "disable_compile": True}),
    # the same dense cache with SDPA's cuDNN backend left out (a backend that plans per key length pays
    # that at every step of a growing cache)
    "dense, SDPA without cuDNN": (None, {"sdpa": "no-cudnn"}),
    "window 2048 + 4 sinks": ({"window": 2048, "sinks": 4}, {}),
    "int4 g32, 4 sinks kept": ({"quant": "int4", "group_size": 32, "sinks": 4}, {}),
    "int4 g64, 4 sinks kept": ({"quant": "int4", "group_size": 64, "sinks": 4}, {}),
    "lfps top-512": ({"sparse": "lfps", "topk": 512}, {}),
    # plain dense once more, after every other mode: does running first in the process cost it?
    "dense, again last": (None, {}),
}
WIDTHS = {  # hidden, MLP, heads (head size 128 but for tiny)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    # 1/8 of the heads at the same head size: the CPU profiles' shapes
    "small": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=4, num_key_value_heads=4),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4),
}


def build(layers: int, width: str, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        num_hidden_layers=layers, vocab_size=32064, max_position_embeddings=40_000, **WIDTHS[width]
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=4)
    cfg.text_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def kv_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values, getattr(layer, "raw", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


class StepClock:
    """A stopping criterion that never stops: ``generate`` calls it once per token, after the token is
    chosen, so the gaps between its calls are decode steps (the prefill ends before the first call).
    Starts ``prof`` (a torch profiler) at the first call: the profile then holds decode steps only."""

    def __init__(self, device, prof=None):
        self.device, self.prof, self.t = device, prof, []

    def __call__(self, input_ids, scores, **kwargs):
        sync(self.device)
        self.t.append(time.perf_counter())
        if self.prof is not None and len(self.t) == 1:
            self.prof.start()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def steps_ms(self) -> list:
        return [1000 * (b - a) for a, b in zip(self.t, self.t[1:])]


def decode_run(model, ids, steps: int, device, extra: dict, profile: bool = False):
    """(ms per decode step: median, first and last 4 steps; KV bytes after the run; peak bytes; profile
    table of the decode steps or None)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import StoppingCriteriaList

    extra = dict(extra)
    no_cudnn = extra.pop("sdpa", None) == "no-cudnn"
    kinds = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def gen(n, clock):
        with torch.no_grad(), sdpa_kernel(kinds) if no_cudnn else nullcontext():
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                return_dict_in_generate=True,
                stopping_criteria=StoppingCriteriaList([clock]),
                **extra,
            )

    gen(3, StepClock(device))  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(device)
    out = gen(steps, clock)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    ms = clock.steps_ms()
    timing = dict(
        ms_per_token=sorted(ms)[len(ms) // 2], first_steps=ms[:4], last_steps=ms[-4:], steps=len(ms)
    )
    table = None
    if profile:  # a second run under the profiler (it slows each op down): op times, not the headline
        table = profile_steps(lambda c: gen(min(steps, 9), c), device)
    return timing, kv_bytes(out.past_key_values), peak, table


def profile_steps(run, device) -> str:
    """The profiler's op table over a run's decode steps, times divided by the number of steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts, profile_memory=True)
    clock = StepClock(device, prof)
    run(clock)
    prof.stop()
    n = len(clock.t)  # the profile runs from the first call to the end of generate: n - 1 steps + the tail
    cuda = device.type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    by_time = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
    mem = "self_device_memory_usage" if cuda else "self_cpu_memory_usage"
    avg = prof.key_averages()
    steps = max(n - 1, 1)
    ops = sum(e.count for e in avg if e.key.startswith("aten::"))
    cpu = sum(e.self_cpu_time_total for e in avg) / 1000
    head = (
        f"# decode steps profiled: {n - 1} (+ generate's tail); times and bytes in the tables are totals\n"
        f"# per step: {ops / steps:.0f} aten ops, {cpu / steps:.2f} ms self CPU time (profiler overhead in)"
    )
    if cuda:
        on_gpu = [e for e in avg if str(getattr(e, "device_type", "")).endswith("CUDA")]  # kernels, copies
        gpu = sum(e.self_device_time_total for e in on_gpu) / 1000
        launches = sum(e.count for e in avg if "LaunchKernel" in e.key)
        syncs = sum(e.count for e in avg if "Synchronize" in e.key or "Memcpy" in e.key)
        head += f", {gpu / steps:.3f} ms GPU time (kernels + copies), {launches / steps:.0f} kernel launches"
        head += f", {syncs / steps:.1f} host syncs / copies"
    by_mem = avg.table(sort_by=mem, row_limit=12, max_name_column_width=60)
    if cuda:
        by_cpu = avg.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
        by_mem += f"\n## by host (CPU) time\n{by_cpu}"
    return f"{head}\n## by time\n{by_time}\n## by memory allocated\n{by_mem}"


def attention_only(context: int, device, dtype, reps: int = 50, compile: bool = True) -> list:
    """One layer's decode attention at ``context`` keys (1 x 32 heads x 128): rows of (what, ms per call,
    aten ops and estimated bytes read / written of one call, ``evals.op_cost``). ``dense sdpa``: SDPA
    over every key. LFPS (top-512, expand 1, a history of random slots) as ``mmsink.kv.sparse.step``
    runs it: ``lfps`` told that every sample is long (``generate``'s cache after its one host check per
    step), ``lfps, device check`` over a buffer 256 slots wider than the keys with the held length a
    device scalar (``generate_fast``'s call: short or long decided on the device), ``lfps dense step``
    (a first step after the prompt: every key scored). Eager rows: wall time, launches included.
    ``... graph``: one CUDA graph replay each (GPU time, no launch cost: the comparison the issue's goal
    means); ``lfps, device check compiled graph``: the same step through ``torch.compile`` (fused
    kernels) then captured, with whether its chosen slots equal the eager step's; ``lfps triton`` (and
    ``graph``): that call through ``mmsink.kv.lfps_triton``'s two kernels, with the same check.
    ``sdpa new length, <backend>``: a key length one longer at every call, as a growing cache gives it."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from evals.op_cost import OpCost
    from mmsink.kv.sparse import step

    g = torch.Generator(device=device).manual_seed(0)
    spare = max(reps + 8, 256)
    q = torch.randn(1, 32, 1, 128, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, 32, context + spare, 128, device=device, dtype=dtype, generator=g)
    v = torch.randn_like(k)
    kc, vc = k[:, :, :context], v[:, :, :context]
    valid = torch.ones(1, context, dtype=torch.bool, device=device)
    wide = torch.zeros(1, context + spare, dtype=torch.bool, device=device)
    wide[:, :context] = True
    length = torch.tensor(context, device=device)
    perms = [torch.randperm(context - 1, device=device, generator=g)[:512] for _ in range(32)]
    hist = torch.stack(perms)[None]  # distinct slots per head, as a step's choice
    cfg = SimpleNamespace(topk=512, expand=1, dense_steps=2, sinks=0)
    scale = 128**-0.5

    def dense():
        return F.scaled_dot_product_attention(q, kc, vc)

    def lfps():
        return step(q[:, :, 0], kc, vc, valid, hist, cfg, False, scale, True)

    def lfps_device():
        return step(q[:, :, 0], k, v, wide, hist, cfg, False, scale, False, length=length)

    def lfps_dense():
        return step(q[:, :, 0], kc, vc, valid, None, cfg, True, scale, None)

    def timed(fn, n=reps, arg=lambda i: ()):
        for i in range(3):
            fn(*arg(n + i))  # warm-up on lengths the timed calls do not use
        sync(device)
        t0 = time.perf_counter()
        for i in range(n):
            fn(*arg(i))
        sync(device)
        return 1000 * (time.perf_counter() - t0) / n

    def counted(fn) -> dict:
        with OpCost() as cost:
            fn()
        return dict(ops=cost.ops, read_bytes=cost.read, written_bytes=cost.written)

    def graphed(fn):
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    rows = []

    def add(what, run, count=None, **extra):
        try:
            ms = run()
        except Exception as e:  # a backend or capture that fails: say so, keep the rest
            ms = f"failed: {type(e).__name__}: {str(e)[:120]}"
        rows.append(dict(what=what, ms=ms, **(count or {}), **extra))

    calls = {
        "dense sdpa": dense,
        "lfps": lfps,
        "lfps, device check": lfps_device,
        "lfps dense step": lfps_dense,
    }
    counts = {name: counted(fn) for name, fn in calls.items()}
    for name, fn in calls.items():
        add(name, lambda fn=fn: timed(fn), counts[name])
    if device.type != "cuda":  # graphs, Triton and SDPA backends: CUDA only
        return rows
    for name in ("dense sdpa", "lfps", "lfps, device check"):
        add(f"{name} graph", lambda name=name: timed(graphed(calls[name])), counts[name])
    from mmsink.kv import lfps_triton

    if lfps_triton.available(device):  # generate_fast's sparse step: the device-check call in two kernels

        def kernel():
            return lfps_triton.sparse_step(q[:, :, 0], k, v, wide, hist, 512, 1, scale, 0, length)

        check = {}

        def first():  # compiles the kernels (inside ``add``: a failure becomes the row's text)
            (out, got), (ref, want) = kernel(), lfps_device()
            check["same slots as eager"] = bool(torch.equal(got.sort(-1).values, want.sort(-1).values))
            check["max abs diff vs eager"] = float((out - ref).abs().max())
            return timed(kernel)

        add("lfps triton", first, launches=2)
        rows[-1].update(check)
        add("lfps triton graph", lambda: timed(graphed(kernel)), launches=2)
    else:
        add("lfps triton", lambda: "skipped: triton does not import")
    if compile:
        fused = torch.compile(lfps_device, dynamic=False)
        same = {}

        def run_compiled():
            t0 = time.perf_counter()
            _, got = fused()
            same["compile_s"] = round(time.perf_counter() - t0, 1)
            _, want = lfps_device()
            same["same slots as eager"] = bool(torch.equal(got.sort(-1).values, want.sort(-1).values))
            return timed(graphed(fused))

        add("lfps, device check compiled graph", run_compiled)
        rows[-1].update(same)

    def grow(i):  # a new length at every call
        return (k[:, :, : context + i], v[:, :, : context + i])

    backends = {
        "default": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }

    def fn(kk, vv):
        return F.scaled_dot_product_attention(q, kk, vv)

    for name, be in backends.items():
        if be is None:
            add(f"sdpa new length, {name}", lambda: timed(fn, reps, grow))
            continue
        with sdpa_kernel([be]):
            add(f"sdpa new length, {name}", lambda: timed(fn, reps, grow))
            add(f"sdpa same length, {name}", lambda: timed(lambda: fn(kc, vc)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--width", choices=sorted(WIDTHS), default="7b")
    ap.add_argument("--tiny", action="store_true", help="= --width tiny (CPU smoke run)")
    ap.add_argument("--modes", default=";".join(MODES), help="';'-separated subset of: " + "; ".join(MODES))
    ap.add_argument("--profile", action="store_true", help="profile decode steps too (profiles.txt)")
    ap.add_argument("--no-attention", action="store_true", help="skip the attention-only timing")
    ap.add_argument(
        "--attention-only", action="store_true", help="only one layer's attention (no model, no decode modes)"
    )
    ap.add_argument("--no-compile", action="store_true", help="attention alone: skip the torch.compile row")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    width = "tiny" if args.tiny else args.width
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = [m.strip() for m in args.modes.split(";")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"kv_decode: unknown mode(s) {unknown}; known: {list(MODES)}")
    model = None if args.attention_only else build(args.layers, width, device, dtype)
    meta = dict(
        command="python -m evals.kv_decode " + shlex.join(argv if argv is not None else sys.argv[1:]),
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        layers=args.layers,
        width=width,
        steps=args.steps,
        dtype=str(dtype),
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profiles.txt").unlink(missing_ok=True)
    rows, attn = [], []
    for ctx in (int(c) for c in args.contexts.split(",")):
        ids = torch.randint(
            3, 32000, (1, ctx), device=device, generator=torch.Generator(device=device).manual_seed(ctx)
        )
        for name in [] if args.attention_only else modes:
            kv, extra = MODES[name]
            if kv is None:
                if model.__dict__.get("_mmsink") is not None:
                    mmsink.unwrap(model)
            else:
                mmsink.wrap(model, kv=kv)
            timing, kvb, peak, table = decode_run(model, ids, args.steps, device, extra, args.profile)
            rows.append(dict(context=ctx, mode=name, **timing, kv_bytes=kvb, peak_bytes=peak))
            print(rows[-1], flush=True)
            if table is not None:  # one file for all modes (the device returns few files)
                with open(out / "profiles.txt", "a") as f:
                    f.write(f"\n\n# ===== context {ctx}, {name}\n{table}")
            write(out, meta, rows, attn)
        if model is not None and model.__dict__.get("_mmsink") is not None:
            mmsink.unwrap(model)
        if (width == "7b" or args.attention_only) and not args.no_attention:
            attn.append(
                dict(context=ctx, rows=attention_only(ctx, device, dtype, compile=not args.no_compile))
            )
            print(attn[-1], flush=True)
            write(out, meta, rows, attn)


def write(out: Path, meta: dict, rows: list, attn: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_decode.json").write_text(json.dumps(dict(meta=meta, decode=rows, attention=attn), indent=1))
    lines = [
        f"# KV-cache modes, decode cost ({meta['device']}, {meta['layers']} layers, width {meta['width']}, "
        f"{meta['dtype']}, torch {meta['torch']})",
        "",
    ]
    if rows:
        lines += [
            "| context | mode | ms / token (median step) | first steps ms | last steps ms | KV MiB "
            "| peak MiB |",
            "|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] else "-"
        kv = r["kv_bytes"] / 2**20
        first, last = (" ".join(f"{t:.1f}" for t in r[k]) for k in ("first_steps", "last_steps"))
        ms = r["ms_per_token"]
        lines.append(f"| {r['context']} | {r['mode']} | {ms:.2f} | {first} | {last} | {kv:.1f} | {peak} |")
    if attn:
        lines += [
            "",
            "One layer's decode attention alone (ms per call; aten ops and MB read + written of one eager",
            "call, estimated from tensor sizes by evals/op_cost.py; x dense: ms of dense sdpa (same eager /",
            "graph kind) over this row's ms):",
            "",
            "| context | what | ms | x dense | aten ops | MB read + written | notes |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in attn:
            ref = {r["what"]: r["ms"] for r in a["rows"]}
            for r in a["rows"]:
                ms = r["ms"]
                val = f"{ms:.4f}" if isinstance(ms, float) else ms
                base = ref.get("dense sdpa graph" if "graph" in r["what"] else "dense sdpa")
                ratio = f"{base / ms:.2f}x" if isinstance(ms, float) and isinstance(base, float) else "-"
                ops = r.get("ops", "-")
                mb = f"{(r['read_bytes'] + r['written_bytes']) / 1e6:.1f}" if "read_bytes" in r else "-"
                known = ("what", "ms", "ops", "read_bytes", "written_bytes")
                notes = ", ".join(f"{k} {v}" for k, v in r.items() if k not in known)
                lines.append(f"| {a['context']} | {r['what']} | {val} | {ratio} | {ops} | {mb} | {notes} |")
    if meta.get("command"):
        lines += ["", f"`{meta['command']}`; torch {meta['torch']}, transformers {meta.get('transformers')}"]
    (out / "kv_decode.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
