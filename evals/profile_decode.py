"""Where does one decode step of ``generate_fast`` spend its time, and what do the step options save?

    python evals/profile_decode.py --out DIR                      # LLaVA-1.5-7B shape, bf16, one GPU
    python evals/profile_decode.py --tiny --out DIR               # CPU, a small model: checks the code path

The model is the bench's (``mmsink bench --shape llava-1.5-7b``: random weights, its prompt of 576 image
tokens + 65 text tokens, batch 1). Per step configuration (``--configs``: ``base`` = the plain step; else
``+``-joined ``fuse``, ``write``, ``gemv``, ``sdpa`` / ``matmul`` / ``reduce`` / ``kernel``:
``mmsink.fast.fuse.StepOptions``):

- step ms: ``--steps`` decode steps back to back (CUDA-graph replays on GPU; no host work between them),
  CUDA events around them, divided by the count; ``plain``: the same steps as plain (compiled) calls;
- bench decode ms/token: the bench's column, (generate_fast of 1 + k tokens - of 1 token) / k;
- the step's kernels by category (GEMV / GEMM, attention, cache writes / copies, norm / element-wise /
  fused Triton, other), count and GPU time per step, for the replayed and the plain step, and the time
  between kernels (event time - kernel time: launch gaps inside the graph).

Configurations alternate rep by rep (ratios within one run). Each configuration's tokens are compared with
``base``'s (equal in fp32; in bf16 near-ties may differ). When any configuration fuses projections the
model is fused first, so every configuration (``base`` too) reads the same weight tensors. JSON + Markdown
go to ``--out``, with the GPU memory allocated after each stage (``held_bytes``), rewritten (whole files
replaced, never half written) after the capture, after every timing rep and after every configuration's
profile: a run cut short keeps what it measured, ``stage`` says how far it got and ``complete`` whether it
ended. Defaults are sized for a capped device call (3 reps, ``--profile-steps`` 8 of the 64 timed steps);
``--full``: 5 reps and every timed step profiled.

Autograd is off throughout (``run``): the steps timed here run outside ``generate_fast``'s ``no_grad``, and
a step with autograd on writes keys and values computed from weights that require grad into the KV
buffers in place, so the buffers carry every step's graph and keep all earlier steps' saved tensors alive.
The compiled ``matmul`` / ``reduce`` steps save a K + V sized tensor per layer (12.8 MB at the 7B shape,
0.41 GB a step): that is how two H200 runs ran out of memory
(``evals/results/fast_path/issue20_targets_2026-12-01``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers

import mmsink
from mmsink.fast import decode as fastmod
from mmsink.fast.fuse import ATTN, StepOptions, fused
from mmsink.tools.bench import SHAPES, bench_inputs, build, clock_for

CATEGORIES = (
    "gemv/gemm",
    "attention",
    "cache writes / copies",
    "norm / element-wise / fused triton",
    "other",
)
# --tiny: a LLaVA shape a loaded 2-core CPU runs in seconds (the bench's image: 576 tokens; GQA)
TINY = "tiny-decode-cpu"
DEFAULT_CONFIGS = "base,fuse,write,matmul,reduce,fuse+write+matmul"
FLAGS = ("fuse", "write", "gemv")  # StepOptions' switches, each spelled as its field
# CPU operators that move no data (views, allocations): not counted as kernels
VIEWS = {
    "empty", "empty_strided", "empty_like", "view", "_unsafe_view", "as_strided", "transpose", "t",
    "reshape", "_reshape_alias", "expand", "slice", "select", "unsqueeze", "squeeze", "split",
    "split_with_sizes", "chunk", "narrow", "permute", "detach", "alias", "resolve_conj", "resolve_neg",
    "lift_fresh", "result_type", "unbind", "contiguous", "view_as", "expand_as", "unflatten", "flatten",
    "is_nonzero", "item", "_local_scalar_dense", "to", "_to_copy_noop", "set_", "size", "stride",
}  # fmt: skip


def options_of(spec: str) -> StepOptions | None:
    """``base`` -> None; ``fuse+write+matmul`` -> StepOptions(fuse=True, write=True, attn="matmul");
    ``fuse+kernel+gemv`` -> StepOptions(fuse=True, attn="kernel", gemv=True)."""
    if spec == "base":
        return None
    kw: dict = {}
    for part in spec.split("+"):
        if part in FLAGS:
            kw[part] = True
        elif part in ATTN:
            kw["attn"] = part
        else:
            use = "/".join(FLAGS + ATTN)
            raise ValueError(f"unknown step option {part!r} in {spec!r}: use base or {use}")
    return StepOptions(**kw)


def category(name: str) -> str:
    """A kernel's (GPU) or operator's (CPU) category, by name."""
    n = name.lower()
    if any(s in n for s in ("fmha", "flash", "attention", "softmax", "attn")):
        return "attention"
    if any(s in n for s in ("index", "scatter", "copy", "memcpy", "memset", "fill", "stack")):
        return "cache writes / copies"
    if any(s in n for s in ("gemv", "gemm", "nvjet", "xmma", "cutlass", "splitk", "cublas", "aten::mm",
                            "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")):  # fmt: skip
        return "gemv/gemm"
    if any(s in n for s in ("triton", "elementwise", "vectorized", "reduce", "aten::", "cpp_fused")):
        return "norm / element-wise / fused triton"
    return "other"


def kernels(fn, n: int, cuda: bool) -> dict:
    """Profile ``fn`` (``n`` steps): per category kernels and microseconds per step, the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    rows = collections.defaultdict(lambda: [0, 0.0])  # name -> [count, us]
    if cuda:
        for e in prof.key_averages():
            if str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0:
                rows[e.key][0] += e.count
                rows[e.key][1] += e.self_device_time_total
    else:  # the outermost operators that are not views or allocations: what eager mode launches

        def walk(e):
            if "cpp_fused" in e.name or (e.name.startswith("aten::") and e.name[6:] not in VIEWS):
                rows[e.name][0] += 1
                rows[e.name][1] += e.cpu_time_total
                return
            for c in e.cpu_children:
                walk(c)

        for e in prof.events():
            if e.cpu_parent is None:
                walk(e)
    cats = {c: [0.0, 0.0] for c in CATEGORIES}
    for name, (count, us) in rows.items():
        c = cats[category(name)]
        c[0] += count / n
        c[1] += us / n
    top = sorted(rows.items(), key=lambda kv: -kv[1][1])[:15]
    return dict(
        categories={k: dict(kernels=round(v[0], 2), us=round(v[1], 2)) for k, v in cats.items()},
        kernels=round(sum(v[0] for v in cats.values()), 2),
        us=round(sum(v[1] for v in cats.values()), 2),
        top=[dict(name=k[:120], per_step=round(c / n, 2), us=round(t / n, 2)) for k, (c, t) in top],
    )


def decode_bytes(model) -> int:
    """Bytes of the weights one decode step reads: the decoder layers, the final norm and the lm_head."""
    lm = model.model.language_model
    seen, total = set(), 0
    for p in [*lm.layers.parameters(), *lm.norm.parameters(), *model.lm_head.parameters()]:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters (fusing must not add any)."""
    seen = {}
    for p in model.parameters():
        s = p.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a run killed mid-write leaves the previous file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def rows_from(times: dict, confs: dict, modes: tuple, k: int, steps: int) -> dict:
    """Per configuration the medians of the reps so far: step ms per mode, the bench's decode ms/token,
    ratios to ``base``."""
    rows = {}
    for spec, opts in confs.items():
        med = {m: statistics.median(v) for m, v in times[spec].items()}
        rows[spec] = dict(
            options=None if opts is None else vars(opts),
            step_ms={m: round(med[m], 4) for m in modes},
            bench_decode_ms=round((med["more"] - med["one"]) / k * 1e3, 4),
            reps_done=len(times[spec]["one"]),
        )
    base = rows["base"]
    for r in rows.values():
        r["ratio"] = {m: round(r["step_ms"][m] / base["step_ms"][m], 4) for m in modes}
        r["ratio"]["bench"] = round(r["bench_decode_ms"] / base["bench_decode_ms"], 4)
    return rows


@torch.no_grad()  # the steps run here, outside generate_fast: with autograd on, they chain (see above)
def run(args, save=None) -> dict:
    """The measurements; ``save(result so far)`` after each stage (capture, every rep, every profile)."""
    save = save or (lambda res: None)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY if args.tiny else args.shape
    specs = args.configs.split(",")
    if specs[0] != "base":
        specs = ["base"] + [s for s in specs if s != "base"]
    confs = {s: options_of(s) for s in specs}
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]):  # the profiler's setup before any graph capture
            pass
    dyn = getattr(torch, "_dynamo", None)
    for name in ("recompile_limit", "cache_size_limit"):  # each configuration compiles the step once
        if dyn is not None and hasattr(dyn.config, name):
            setattr(dyn.config, name, max(getattr(dyn.config, name), 4 * len(confs)))
    fastmod.KEEP = max(fastmod.KEEP, 3 * len(confs) + 2)  # each configuration: 3 lengths kept
    t0 = time.perf_counter()

    def say(text: str) -> None:  # with the GPU memory held: a run on the H200 ran out of memory unexplained
        held = f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB held" if cuda else ""
        print(f"[{time.perf_counter() - t0:6.1f} s{held}] {text}", file=sys.stderr, flush=True)

    model = build(shape, args.device, dtype)
    model.generation_config.eos_token_id = None  # random weights: fixed lengths
    inputs, n_vis = bench_inputs(model, 1, 35, 29, args.device, dtype)
    if args.method != "none":
        method, _, budget = args.method.partition(":")
        mmsink.wrap(model, prune=method, **({"budget": int(budget)} if budget else {}))
    compile = (cuda or args.compile) and not args.no_compile
    if compile and not cuda:  # the compiled step's C++ kernels as profiler events (counted as kernels)
        import torch._inductor.config as inductor

        inductor.cpp.enable_kernel_profile = True
    graphs = cuda
    family = None
    memory = dict(storage_bytes_before=storage_bytes(model))
    if any(o is not None and o.fuse for o in confs.values()):
        from mmsink.patches import family_for

        family = family_for(model)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        fused(model, family.layers)
        if cuda:
            memory["fuse_transient_bytes"] = torch.cuda.max_memory_allocated() - held
            memory["fuse_kept_bytes"] = torch.cuda.memory_allocated() - held
    memory["storage_bytes_after"] = storage_bytes(model)
    steps = args.steps

    def fast(opts, n):
        return mmsink.generate_fast(
            model, max_new_tokens=n, graphs=graphs, compile=compile, step=opts, **inputs
        )

    decs, tokens = {}, {}
    held_at = {}  # GPU memory allocated after each stage (CUDA only): what each configuration keeps

    def note(stage: str) -> None:
        if cuda:
            torch.cuda.synchronize()
            held_at[stage] = torch.cuda.memory_allocated()

    note("model")
    weights = decode_bytes(model)
    k = args.bench_tokens
    modes = ("graph", "plain") if graphs else ("plain",)
    res = dict(
        shape=shape,
        device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        dtype=str(dtype),
        method=args.method,
        visual_tokens=n_vis,
        prompt_tokens=inputs["input_ids"].shape[1],
        steps=steps,
        profile_steps=args.profile_steps,
        reps=args.reps,
        bench_tokens=k,
        compile=compile,
        graphs=graphs,
        weights_bytes=weights,
        memory=memory,
        held_bytes=held_at,
        configs={},
        stage="model built",
        complete=False,
    )

    def stage(text: str) -> None:
        res["stage"], res["seconds"] = text, round(time.perf_counter() - t0, 1)
        save(res)

    for spec, opts in confs.items():
        say(f"{spec}: compile / capture")
        for _ in range(2):  # the second call captures the prefill tail, where the model hands off
            tokens[spec] = fast(opts, steps + 1)
        decs[spec] = next(reversed(model.__dict__[fastmod.STORE].values()))  # the one just used
        note(f"{spec} captured")
    stage("captured")
    clock = clock_for(cuda)

    def stepper(dec, graph: bool, n: int = steps):
        def go():
            for _ in range(n):
                dec.graph() if graph else dec.step()

        def timed():
            dec.t.zero_()  # steps stay within the buffers' new slots
            return clock(go)

        return go, timed

    times = {s: {m: [] for m in (*modes, "one", "more")} for s in confs}
    say(f"timing: {args.reps} reps, configurations alternated")
    for rep in range(args.reps + 1):  # rep 0 warms up
        say(f"rep {rep}")
        for spec, opts in confs.items():
            for mode in modes:
                ms = stepper(decs[spec], mode == "graph")[1]() / steps * 1e3
                if rep:
                    times[spec][mode].append(ms)
            one = clock(lambda opts=opts: fast(opts, 1))
            more = clock(lambda opts=opts: fast(opts, 1 + k))
            if rep:
                times[spec]["one"].append(one)
                times[spec]["more"].append(more)
        note(f"rep {rep}")
        if rep:
            res["configs"] = rows_from(times, confs, modes, k, steps)
            stage(f"timed {rep} of {args.reps} reps")
    rows = res["configs"]
    for spec in confs:
        r = rows[spec]
        dec = decs[spec]
        r["same_tokens_as_base"] = bool(torch.equal(tokens[spec], tokens["base"]))
        r["kv_bytes"] = sum(
            {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in dec.k + dec.v}.values()
        )
        if not r["same_tokens_as_base"]:
            a, b = tokens[spec][0], tokens["base"][0]
            r["first_difference"] = int((a != b).nonzero()[0]) - inputs["input_ids"].shape[1]
        if "graph" in modes:
            r["weights_GBps"] = round(weights / (r["step_ms"]["graph"] / 1e3) / 1e9, 1)
    stage("timed")
    n = args.profile_steps
    for spec in confs:
        say(f"{spec}: profile ({n} steps per mode)")
        r, dec = rows[spec], decs[spec]
        r["profile"] = {}
        for mode in modes:
            go = stepper(dec, mode == "graph", n)[0]
            dec.t.zero_()
            p = kernels(go, n, cuda)
            if cuda:  # step time not covered by kernels
                p["idle_us"] = round(r["step_ms"][mode] * 1e3 - p["us"], 2)
            r["profile"][mode] = p
        stage(f"profiled {spec}")
    res["complete"] = True
    stage("done")
    return res


def markdown(res: dict) -> str:
    """The tables of what ``res`` holds so far (a cut run: the stage it reached, the rows it has)."""
    configs = res["configs"]
    modes = list(next(iter(configs.values()))["step_ms"]) if configs else []
    out = [
        f"## decode step: {res['shape']}, {res['dtype']}, batch 1, {res['device']}, torch {res['torch']}, "
        f"transformers {res.get('transformers', '?')}",
        "",
        *([] if res.get("complete") else [f"**Partial run**: stopped after stage `{res['stage']}`.", ""]),
        f"method {res['method']}; prompt {res['prompt_tokens']} tokens ({res['visual_tokens']} visual); "
        f"compile {res['compile']}, graphs {res['graphs']}; {res['steps']} steps per timing, median of "
        f"{res['reps']} reps, configurations alternated. Step ms: CUDA events (perf_counter on CPU) around "
        "the steps back to back / steps; bench decode: (generate_fast of 1 + k tokens - of 1) / k "
        f"(k = {res['bench_tokens']}). Decode weights: {res['weights_bytes'] / 1e9:.2f} GB. Memory: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in res["memory"].items()),
        "",
        *(
            [
                "GPU memory allocated after each stage: "
                + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in res["held_bytes"].items()),
                "",
            ]
            if res["held_bytes"]
            else []
        ),
    ]
    if not configs:
        return "\n".join(out + ["No timing yet."]) + "\n"
    out += [
        "| config | reps | "
        + " | ".join(f"{m} ms/step (ratio)" for m in modes)
        + " | bench decode ms/token (ratio) | GB/s of weights | same tokens as base | KV MB |",
        "|---|---|" + "---|" * (len(modes) + 4),
    ]
    for spec, r in configs.items():
        cells = [f"{r['step_ms'][m]:.3f} ({r['ratio'][m]:.3f})" for m in modes]
        same = r.get("same_tokens_as_base")
        same = "-" if same is None else "yes" if same else f"no (from token {r.get('first_difference')})"
        kv = f"{r['kv_bytes'] / 1e6:.1f}" if "kv_bytes" in r else "-"
        out.append(
            f"| {spec} | {r.get('reps_done', res['reps'])} | "
            + " | ".join(cells)
            + f" | {r['bench_decode_ms']:.3f} ({r['ratio']['bench']:.3f}) | "
            f"{r.get('weights_GBps', '-')} | {same} | {kv} |"
        )
    profiled = {spec: r for spec, r in configs.items() if r.get("profile")}
    if not profiled:
        return "\n".join(out + ["", "No profile yet."]) + "\n"
    unit = "kernels" if res["graphs"] else "operators"
    n = res.get("profile_steps", res["steps"])
    out += [
        "",
        f"Per step, by category ({n} steps profiled per mode): {unit} / step, us / step "
        f"({'GPU' if res['graphs'] else 'CPU'} time)",
        "",
    ]
    head = "| config | mode | " + " | ".join(CATEGORIES) + " | total | idle between kernels us |"
    out += [head, "|---|---|" + "---|" * (len(CATEGORIES) + 2)]
    for spec, r in profiled.items():
        for m, p in r["profile"].items():
            cells = [
                f"{p['categories'][c]['kernels']:g} / {p['categories'][c]['us']:.1f}" for c in CATEGORIES
            ]
            out.append(
                f"| {spec} | {m} | " + " | ".join(cells) + f" | {p['kernels']:g} / {p['us']:.1f} | "
                f"{p.get('idle_us', '-')} |"
            )
    for spec, r in profiled.items():
        mode = modes[0]
        out += ["", f"Top kernels of `{spec}` ({mode}): per step, us per step", ""]
        out += ["| kernel | per step | us |", "|---|---|---|"]
        out += [f"| `{t['name']}` | {t['per_step']:g} | {t['us']:.1f} |" for t in r["profile"][mode]["top"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llava-1.5-7b", choices=sorted(SHAPES))
    ap.add_argument("--tiny", action="store_true", help=f"CPU, the {TINY} shape: checks the code path")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated (default {DEFAULT_CONFIGS})")
    ap.add_argument("--method", default="none", help="none (the unwrapped model) or METHOD[:BUDGET]")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per timing (<= 127, default 64)")
    ap.add_argument("--reps", type=int, default=None, help="timing reps (default 3; --full 5)")
    ap.add_argument(
        "--profile-steps",
        type=int,
        default=None,
        help="decode steps per profiled mode (default 8, at most --steps; --full: --steps)",
    )
    ap.add_argument("--full", action="store_true", help="5 reps and every timed step profiled")
    ap.add_argument("--bench-tokens", type=int, default=32, help="k of the bench's decode column")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--compile", action="store_true", help="on CPU too: counts the compiled step's fused C++ kernels"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if not 1 <= args.steps <= 127:
        ap.error(f"--steps must be within 1..127 (the decoder's new slots), got {args.steps}")
    args.reps = args.reps if args.reps is not None else 5 if args.full else 3
    if args.profile_steps is None:
        args.profile_steps = args.steps if args.full else min(8, args.steps)
    if args.reps < 1 or args.bench_tokens < 1 or not 1 <= args.profile_steps <= args.steps:
        ap.error("--reps and --bench-tokens must be >= 1, --profile-steps within 1..--steps")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA device here: use --tiny (CPU) or --device cpu")
    for spec in args.configs.split(","):
        try:
            options_of(spec)
        except ValueError as e:
            ap.error(str(e))
    save = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        shape = TINY if args.tiny else args.shape
        stem = os.path.join(args.out, f"decode_{shape}_{args.method.replace(':', '')}")
        command = "python evals/profile_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])

        def save(res: dict) -> None:
            res["command"] = command
            write_atomic(stem + ".json", json.dumps(res, indent=1))
            write_atomic(stem + ".md", f"Command: `{command}`\n\n" + markdown(res))

    res = run(args, save)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
