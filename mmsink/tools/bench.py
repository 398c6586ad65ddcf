"""Benchmarks on real-size architectures with random weights (speed does not depend on weight values).

``mmsink bench --shape tiny-cpu``      prefill time ratio vs FLOPs ratio per method and budget
``mmsink bench --analytic llava-1.5-7b``  prefill FLOPs of the real config for token schedules

Each writes JSON and a Markdown table (``--out DIR``) and prints the table.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mmsink.evals.vqa import parse_opts

SHAPES = {
    # a small LLaVA-shaped model that a 2-core CPU runs in about a second: 576 visual tokens, 12 layers
    "tiny-cpu": {
        "vision": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
        "text": dict(
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=12,
            num_attention_heads=8,
            vocab_size=32064,
        ),
    },
    # LLaVA-1.5's token counts and depth at a tiny width: evals/selection_ops counts ops, not their size
    "selection-ops": {
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        "text": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=32,
            num_attention_heads=4,
            vocab_size=32064,
        ),
    },
    # a LLaVA shape whose decode step a loaded 2-core CPU profiles in seconds (evals/profile_decode --tiny)
    "tiny-decode-cpu": {
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        "text": dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=32064,  # the bench prompt uses ids up to 32000 (image)
        ),
    },
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B (Llama-2-7B shape)
    "llava-1.5-7b": {
        "vision": dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
        ),
        "text": dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=32064,
        ),
    },
}
# LLaVA-NeXT-7B: the 1.5-7B towers with anyres tiling; a 672x672 image = base + 4 tiles of 336 px
SHAPES["llava-next-7b"] = dict(SHAPES["llava-1.5-7b"], family="llava_next")
SHAPES["tiny-next-cpu"] = {  # for tests: NeXT's input path at a size a CPU test affords
    "family": "llava_next",
    "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
    "text": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4, vocab_size=32064
    ),
}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# Qwen2-VL-7B with one 1400x1400 image: 100x100 patches, 2x2 merged = 2500 visual tokens
SHAPES["qwen2-vl-7b"] = {
    "family": "qwen2_vl",
    "grid": (100, 100),
    "ids": (151655, 151656, 151652, 151653),  # image, video, vision start, vision end
    "vision": dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
    "text": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
    ),
}
SHAPES["tiny-qwen-cpu"] = {  # for tests: Qwen's input path at a size a CPU test affords (196 tokens)
    "family": "qwen2_vl",
    "grid": (28, 28),
    "ids": (32000, 32001, 32002, 32003),
    "vision": dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2),
    "text": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32064,
        rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e4},
    ),
}
IMAGE_TOKEN = 32000


def build(shape: str, device="cpu", dtype=torch.float32, attn="sdpa"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    s = SHAPES[shape]
    if s.get("family") == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        image, video, start, end = s["ids"]
        vision = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **s["vision"])
        cfg = Qwen2VLConfig(
            text_config=dict(max_position_embeddings=32768, **s["text"]),
            vision_config=vision,
            image_token_id=image,
            video_token_id=video,
            vision_start_token_id=start,
            vision_end_token_id=end,
        )
        cfg._attn_implementation = attn
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(cfg)
        if device != "meta":
            model = model.to(dtype)
            model.set_attn_implementation(attn)
        return model.eval()
    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **s["vision"])
    text = LlamaConfig(max_position_embeddings=8192, pad_token_id=0, **s["text"])
    if s.get("family") == "llava_next":
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        cfg = LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=IMAGE_TOKEN,
            image_grid_pinpoints=PINPOINTS,
        )
        cls = LlavaNextForConditionalGeneration
    else:
        cfg = LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=576
        )
        cls = LlavaForConditionalGeneration
    cfg._attn_implementation = attn
    with torch.device(device):
        model = cls(cfg)
    if device != "meta":
        model = model.to(dtype)
        model.set_attn_implementation(attn)
    return model.eval()


def bench_inputs(
    model, batch: int, n_sys: int, n_text: int, device="cpu", dtype=torch.float32, seed=0, grid=None
):
    """(inputs, visual tokens per prompt): LLaVA-1.5 (576 tokens), LLaVA-NeXT (one 672x672 image: its
    token count comes from the model's own anyres packing) or Qwen2-VL (one image of patch ``grid``)."""
    if model.config.model_type == "qwen2_vl":
        return qwen_inputs(model, grid, batch, n_sys, n_text, device, dtype, seed)
    if model.config.model_type != "llava_next":
        return llava_inputs(batch, n_sys, n_text, device, dtype, seed), 576
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(batch, 5, 3, 336, 336, generator=g).to(device, dtype)
    sizes = torch.tensor([[672, 672]] * batch, device=device)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pix[:1], image_sizes=sizes[:1], return_dict=True)
    n_vis = feats.pooler_output[0].shape[0]
    sys = torch.randint(3, 30000, (n_sys,), generator=g)
    txt = torch.randint(3, 30000, (n_text,), generator=g)
    ids = torch.cat([torch.tensor([1]), sys, torch.full((n_vis,), IMAGE_TOKEN), txt])[None].repeat(batch, 1)
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    return dict(inputs, pixel_values=pix, image_sizes=sizes), n_vis


def qwen_inputs(model, grid, batch: int, n_sys: int, n_text: int, device="cpu", dtype=torch.float32, seed=0):
    """One image per prompt whose patch grid is the shape's ``grid`` (2x2 patches merge into a token)."""
    h, w = grid
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n_vis = h * w // 4
    sys = torch.randint(3, 30000, (n_sys,), generator=g)
    txt = torch.randint(3, 30000, (n_text,), generator=g)
    ids = torch.cat(
        [
            torch.tensor([1]),
            sys,
            torch.tensor([cfg.vision_start_token_id]),
            torch.full((n_vis,), cfg.image_token_id),
            torch.tensor([cfg.vision_end_token_id]),
            txt,
        ]
    )[None].repeat(batch, 1)
    pix = torch.randn(batch * h * w, 3 * 2 * 14 * 14, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pix.to(device, dtype),
        "image_grid_thw": torch.tensor([[1, h, w]] * batch, device=device),
        "mm_token_type_ids": (ids == cfg.image_token_id).long().to(device),
    }, n_vis


def llava_inputs(batch: int, n_sys: int, n_text: int, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sys = torch.randint(3, 30000, (n_sys,), generator=g)
    txt = torch.randint(3, 30000, (n_text,), generator=g)
    ids = torch.cat([torch.tensor([1]), sys, torch.full((576,), IMAGE_TOKEN), txt])
    ids = ids[None].repeat(batch, 1)
    pix = torch.randn(batch, 3, 336, 336, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pix.to(device, dtype),
    }


# ------------------------------------------------------------------------------ measured (CPU / GPU)

METHOD_GRID = [
    ("fastv", (192, 128, 64)),
    ("pdrop", (192, 128, 64)),
    ("dart", (192, 128, 64)),
    ("random", (192, 128, 64)),
    ("pool", (196, 144, 64)),
    ("visipruner", (192, 128, 64)),
]


def alternated(fn, states: dict, reps: int, sync=None, warm: int = 1) -> dict:
    """Median time of ``fn`` in each state, the states taken in turn within every rep (one warm-up
    round): slow drift of a shared machine hits all of them alike. ``warm``: untimed calls after each
    switch (generate_fast captures a prefill tail the second time its shape comes: 2)."""
    times = {k: [] for k in states}
    for rep in range(reps + 1):
        for name, enter in states.items():
            enter()
            for _ in range(warm):
                fn()  # the first calls after a switch pay any one-off work; time the next
            if sync:
                sync()
            t = time.perf_counter()
            fn()
            if sync:
                sync()
            if rep:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn, reps: int, sync=None) -> float:
    fn()
    out = []
    for _ in range(reps):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def clock_for(cuda: bool):
    """``clock(fn)`` -> seconds that ``fn`` took: on CUDA between two events recorded on the current
    stream around it (the device's own timeline; the host waits only after the second event), on CPU by
    ``perf_counter``."""
    if not cuda:

        def host(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        return host

    def device(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return device


DECODE_MEANS = (
    "decode ms/token: (time of generate_fast for 1 + k new tokens - time for 1 new token) / k, the two "
    "alternated rep by rep, median of each (CUDA events on GPU, perf_counter on CPU): the cost of one "
    "greedy decode step of generate_fast (static caches; one CUDA graph replay per token on GPU) at "
    "this method's KV length; 'noise' where the difference came out <= 0 (steps below the timing noise)"
)


def decode_step_ms(run, k: int, reps: int, clock) -> float:
    """(ms) per decode step: ``run(n)`` generates n new tokens; runs of 1 + k and of 1 alternate (after
    two untimed calls of each: compile, then the prefill tail's capture) and the medians' difference is
    divided by k. Both runs share the prefill and first token, so what remains is k decode steps."""
    if k < 1 or reps < 1:
        raise ValueError(f"decode timing needs k >= 1 and reps >= 1, got k={k}, reps={reps}")
    for n in (1, 1 + k, 1, 1 + k):
        run(n)
    one, more = [], []
    for _ in range(reps):
        one.append(clock(lambda: run(1)))
        more.append(clock(lambda: run(1 + k)))
    return (statistics.median(more) - statistics.median(one)) / k * 1e3


def kv_bytes(cache) -> int:
    """Bytes of the keys and values a cache holds (every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def measure(
    shape: str,
    reps: int,
    batch: int,
    device: str,
    dtype,
    grid=None,
    decode_tokens: int = 16,
    e2e_tokens: int = 0,
    ragged: bool = False,
    varlen: bool | None = None,
    var_tau: float | None = None,
    progress=None,
    opts=None,
) -> dict:
    """Per method: prefill time, the ideal row (the same plan replayed with no selection work), time to
    first token, decode time per token, KV-cache bytes, peak memory of the prefill, FLOPs.
    ``ragged``: left-pad sample i by 2 * i tokens (prompts of different lengths); ``varlen``: passed to
    ``mmsink.wrap`` (the ragged kernel for padded segments); ``var_tau``: add a VAR row (sink channels
    1415 / 2533, this threshold: random weights have no real sinks, so a low tau makes some tokens
    qualify and VAR's attention edit run), timed alternately with the model without it. ``opts``: method
    options as ``--opt`` items (``key=value`` for every method, ``method.key=value`` for one). ``progress``:
    called with a line of text up front, with an estimate after the baseline row and after every row."""
    import mmsink

    grid = grid or [(m, b) for m, budgets in METHOD_GRID for b in budgets] + [("visipruner", None)]
    say = progress or (lambda text: None)
    total = 1 + len(grid) + bool(var_tau)
    say(
        f"bench {shape}: {total} rows (baseline, {len(grid)} method settings"
        + (", VAR" if var_tau else "")
        + f"), {reps} timed reps each; an estimate follows the baseline row"
    )
    clock = [time.perf_counter(), time.perf_counter()]  # start, last row's end

    def done(i: int, name: str, per_row: float | None = None) -> None:
        now = time.perf_counter()
        took, elapsed = now - clock[1], now - clock[0]
        clock[1] = now
        per_row = per_row or elapsed / i
        left = per_row * (total - i)
        say(f"[{i}/{total}] {name}: {took:.1f} s ({elapsed:.0f} s so far, about {left:.0f} s left)")

    model = build(shape, device, dtype)
    model.generation_config.eos_token_id = None  # random weights: time fixed lengths
    inputs, n_vis = bench_inputs(model, batch, 35, 29, device, dtype, grid=SHAPES[shape].get("grid"))
    if ragged:
        for i in range(batch):  # the first 2 * i tokens become padding (system text; the image stays whole)
            p = min(2 * i, 34)
            inputs["attention_mask"][i, :p] = 0
            inputs["input_ids"][i, :p] = 0
            inputs["input_ids"][i, p] = 1  # the sample's BOS after its padding
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    tick = clock_for(cuda)

    def prefill():
        with torch.no_grad():
            return model(**inputs, logits_to_keep=1, use_cache=True)

    def generate(n):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def profile() -> dict:
        """Timings and memory of whatever the model is now (wrapped or not)."""
        ms = timed(prefill, reps, sync) * 1e3
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        out = prefill()
        peak = torch.cuda.max_memory_allocated() - held if cuda else None
        kv = kv_bytes(out.past_key_values)
        del out
        n = max(1, reps // 2)
        ttft = timed(lambda: generate(1), n, sync) * 1e3
        fast = lambda k: mmsink.generate_fast(model, max_new_tokens=k, **inputs)  # noqa: E731
        decode = decode_step_ms(fast, decode_tokens, max(3, n), tick)
        r = dict(ms=ms, ttft_ms=ttft, decode_ms=decode, kv_bytes=kv, peak_bytes=peak)
        if e2e_tokens:  # prefill + e2e_tokens new tokens: transformers' generate vs generate_fast
            r["e2e_ms"] = timed(lambda: generate(e2e_tokens), n, sync) * 1e3
            fast = lambda: mmsink.generate_fast(model, max_new_tokens=e2e_tokens, **inputs)  # noqa: E731
            fast()  # (``timed`` warms up once more: the prefill tail's graph is captured at the 2nd call)
            r["fast_ms"] = timed(fast, n, sync) * 1e3
            first = lambda: mmsink.generate_fast(model, max_new_tokens=1, **inputs)  # noqa: E731
            first()
            r["fast_ttft_ms"] = timed(first, reps, sync) * 1e3  # prefill; layers after the plan: a graph
        return r

    def ttft_alternated(wrap_method) -> dict:
        """(ms) the unwrapped model's prefill (``model(...)``: HF's time to first logits), the unpruned
        model through generate_fast's graphed prefill, and the method (``wrap_method()`` wraps the model
        with it) through generate_fast."""
        first = lambda: mmsink.generate_fast(model, max_new_tokens=1, **inputs)  # noqa: E731
        plan = {
            "hf_prefill": (lambda: mmsink.unwrap(model), prefill),
            "graphed_unpruned": (lambda: mmsink.wrap(model, prune="none", varlen=varlen), first),
            "method": (wrap_method, first),
        }
        now = []
        states = {k: (lambda k=k: (now.__setitem__(slice(None), [k]), plan[k][0]())) for k in plan}
        t = alternated(lambda: plan[now[0]][1](), states, reps, sync, warm=2)
        return {f"{k}_ms": v * 1e3 for k, v in t.items()}

    started = time.perf_counter()
    base = profile()
    profiled = time.perf_counter() - started
    if e2e_tokens:  # the unpruned model through the same graphed prefill ('none' hands off at layer 0)
        mmsink.wrap(model, prune="none", varlen=varlen)
        first = lambda: mmsink.generate_fast(model, max_new_tokens=1, **inputs)  # noqa: E731
        first()
        base["fast_ttft_graphed_ms"] = timed(first, reps, sync) * 1e3
    mmsink.wrap(model, prune=None, varlen=varlen)
    prefill()
    base_flops = mmsink.stats(model).prefill_flops
    rows = [dict(method="baseline", budget=None, kept=n_vis, flops_ratio=1.0, **base)]
    # a method's row: a profile like the baseline's, then its prefill, its ideal and the baseline
    # alternated (the pruned two about half the baseline's time)
    row_s = profiled + 2 * (reps + 1) * base["ms"] / 1e3
    done(1, "baseline", row_s)
    for i, (method, budget) in enumerate(grid, 2):
        name = f"{method} {'adaptive' if budget is None else budget}"
        more = parse_opts(opts, method) if opts else {}
        try:
            mmsink.wrap(model, prune=method, budget=budget, varlen=varlen, **more)  # may be refused
            r = profile()
        except ValueError as e:  # e.g. a budget this depth cannot schedule
            rows.append(dict(method=method, budget=budget, error=str(e)))
            done(i, f"{name}: refused ({e})")
            continue
        st = mmsink.stats(model)
        r.update(method=method, budget=budget, kept=round(st.mean_kept, 1))
        r["flops_ratio"] = st.prefill_flops / base_flops
        # the three prefills again, alternating rep by rep, so that host drift cancels out of the ratios
        states = {
            "base": lambda: mmsink.unwrap(model),
            "method": lambda m=method, b=budget, o=more: mmsink.wrap(
                model, prune=m, budget=b, varlen=varlen, **o
            ),
            "ideal": lambda p=st.kept_indices: mmsink.wrap(model, prune="replay", plan=p, varlen=varlen),
        }
        t = alternated(prefill, states, reps, sync)
        r["ms"], r["ideal_ms"], r["base_ms"] = t["method"] * 1e3, t["ideal"] * 1e3, t["base"] * 1e3
        if e2e_tokens:  # time to first token: HF prefill, graphed unpruned, the method; alternated too
            r["ttft_alt"] = ttft_alternated(states["method"])
        rows.append(r)
        done(i, name)
    if var_tau:  # VAR's cost: its grouped attention in layers 2 .. L-2, against the same model without it
        hidden = model.config.get_text_config().hidden_size
        cfg = {"sink_dims": tuple(d % hidden for d in (1415, 2533)), "tau": var_tau}
        mmsink.wrap(model, prune=None, var=cfg, varlen=varlen)
        r = profile()  # with e2e_tokens: generate_fast's VAR (handed off before layer 0, tail graphed)
        st = mmsink.stats(model)
        sinks = st.extra.get("var_sinks", {})
        r.update(method="var", budget=None, kept=round(st.mean_kept, 1), var=cfg)
        r["flops_ratio"] = st.prefill_flops / base_flops
        r["var_sink_tokens"] = {k: v["visual"] for k, v in sinks.items()}
        states = {
            "base": lambda: mmsink.unwrap(model),
            "method": lambda: mmsink.wrap(model, prune=None, var=cfg, varlen=varlen),
        }
        t = alternated(prefill, states, reps, sync)
        r["ms"], r["base_ms"] = t["method"] * 1e3, t["base"] * 1e3
        if e2e_tokens:  # VAR's time to first token against the graphed unpruned prefill, alternated
            r["ttft_alt"] = ttft_alternated(states["method"])
        rows.append(r)
        done(total, "var")
    if getattr(model, "_mmsink", None) is not None:
        mmsink.unwrap(model)
    for r in rows:
        if "ms" in r:
            base_ms = r.get("base_ms", base["ms"])
            r["time_ratio"] = r["ms"] / base_ms
            r["kv_ratio"] = r["kv_bytes"] / base["kv_bytes"]
        if "ideal_ms" in r:
            r["ideal_ratio"] = r["ideal_ms"] / r["base_ms"]
            r["of_ideal"] = r["ideal_ms"] / r["ms"]  # achieved speedup / the ideal row's speedup
            r["selection_overhead"] = (r["ms"] - r["ideal_ms"]) / r["ms"]
    return {
        "shape": shape,
        "visual_tokens": n_vis,
        "batch": batch,
        "device": device,
        "dtype": str(dtype),
        "reps": reps,
        "decode_tokens": decode_tokens,
        "decode_means": DECODE_MEANS,
        "e2e_tokens": e2e_tokens,
        "ragged": ragged,
        "varlen": varlen,
        "rows": rows,
    }


def md_row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def measured_markdown(res: dict) -> str:
    lines = [
        f"{res['shape']} model (random weights), batch {res['batch']}, {res['device']}, {res['dtype']}, "
        f"median of {res['reps']} runs; ratios against the unpruned model in the same run (each method's "
        "prefill, its ideal and the baseline alternate rep by rep). ideal: the same "
        "per-layer plan replayed with no selection work (`prune='replay'`); of ideal: ideal time / time "
        "(1.0 = the method gets all of its plan's speedup); selection overhead: (time - ideal) / time. "
        f"{res.get('decode_means', 'decode: ms per token')} (k = {res['decode_tokens']}); "
        "TTFT: `generate` of one token; "
        "peak: allocator peak of one prefill above the weights."
        + (
            f" Ragged prompts: sample i left-padded by 2 * i tokens; varlen kernel "
            f"{'off' if res.get('varlen') is False else 'where available'}."
            if res.get("ragged")
            else ""
        ),
        "",
        "| method | budget | visual tokens / layer | prefill ms | time ratio | ideal ratio | of ideal | "
        "selection overhead | TTFT ms | decode ms/token (generate_fast) | KV MB (ratio) | peak MB | "
        "FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mb = 2**20
    for r in res["rows"]:
        b = "adaptive" if r["method"] == "visipruner" and r["budget"] is None else r["budget"] or "-"
        if "error" in r:
            lines.append(f"| {r['method']} | {b} | " + " | ".join(["-"] * 10) + f" | - ({r['error']}) |")
            continue
        ideal = "ideal_ms" in r
        lines.append(
            md_row(
                r["method"],
                b,
                r["kept"],
                f"{r['ms']:.1f}",
                f"{r['time_ratio']:.3f}",
                f"{r['ideal_ratio']:.3f}" if ideal else "-",
                f"{r['of_ideal']:.2f}" if ideal else "-",
                f"{100 * r['selection_overhead']:.1f} %" if ideal else "-",
                f"{r['ttft_ms']:.1f}",
                f"{r['decode_ms']:.1f}" if r["decode_ms"] > 0 else "noise",  # a difference of two medians
                f"{r['kv_bytes'] / mb:.1f} ({r['kv_ratio']:.3f})",
                f"{r['peak_bytes'] / mb:.0f}" if r["peak_bytes"] is not None else "-",
                f"{r['flops_ratio']:.3f}",
            )
        )
    if res.get("e2e_tokens"):
        n = res["e2e_tokens"]
        lines += [
            "",
            f"Prefill + {n} new tokens (greedy), ms: transformers' `generate` (dynamic cache) against "
            "`mmsink.generate_fast` (static per-layer caches; the decode step as one CUDA graph on GPU; "
            "the prefill's layers after the plan's last decision as one graph). TTFT: one new token; "
            "graphed unpruned: the model wrapped with `prune='none'` through generate_fast, whose whole "
            "LLM prefill is then one graph.",
            "",
            "| method | budget | generate ms | generate_fast ms | fast / generate | fast / baseline "
            "generate | TTFT: generate ms | generate_fast ms | ratio to baseline generate_fast | ratio to "
            "graphed unpruned |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        base = res["rows"][0]
        for r in res["rows"]:
            if "e2e_ms" not in r:
                continue
            b = "adaptive" if r["method"] == "visipruner" and r["budget"] is None else r["budget"] or "-"
            lines.append(
                md_row(
                    r["method"],
                    b,
                    f"{r['e2e_ms']:.1f}",
                    f"{r['fast_ms']:.1f}",
                    f"{r['fast_ms'] / r['e2e_ms']:.3f}",
                    f"{r['fast_ms'] / base['e2e_ms']:.3f}",
                    f"{r['ttft_ms']:.1f}",
                    f"{r['fast_ttft_ms']:.1f}",
                    f"{r['fast_ttft_ms'] / base['fast_ttft_ms']:.3f}",
                    f"{r['fast_ttft_ms'] / base['fast_ttft_graphed_ms']:.3f}"
                    if "fast_ttft_graphed_ms" in base
                    else "-",
                )
            )
    alt = [r for r in res["rows"] if "ttft_alt" in r]
    if alt:
        lines += [
            "",
            "Time to first token, the three taken in turn rep by rep (median ms): HF prefill = the unwrapped "
            "model's `model(...)` (its first logits); graphed unpruned = the model wrapped with "
            "`prune='none'` through `generate_fast` (vision tower and LLM layers as CUDA graphs); method = "
            "the method through `generate_fast`.",
            "",
            "| method | budget | HF prefill ms | graphed unpruned ms | method ms | speedup vs HF prefill | "
            "speedup vs graphed unpruned |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in alt:
            t = r["ttft_alt"]
            b = "adaptive" if r["method"] == "visipruner" and r["budget"] is None else r["budget"] or "-"
            lines.append(
                md_row(
                    r["method"],
                    b,
                    f"{t['hf_prefill_ms']:.1f}",
                    f"{t['graphed_unpruned_ms']:.1f}",
                    f"{t['method_ms']:.1f}",
                    f"{t['hf_prefill_ms'] / t['method_ms']:.2f}x",
                    f"{t['graphed_unpruned_ms'] / t['method_ms']:.2f}x",
                )
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ analytic


def schedules(num_layers: int, n_vis: int = 576, budgets=(192, 128, 64)):
    """Visual tokens per layer for each method as our implementation schedules them."""
    from ..pruners.pdrop import schedule as pdrop_schedule

    out = {"baseline": [n_vis] * num_layers}
    for k in budgets:
        out[f"fastv/dart {k} (K=2)"] = [n_vis] * 2 + [k] * (num_layers - 2)
        layers, lam = pdrop_schedule(num_layers, k / n_vis)
        counts, cur = [], n_vis
        for layer in range(num_layers):
            if layer in layers:
                cur = math.ceil(cur * lam)
            counts.append(cur)
        out[f"pdrop {k} (layers {list(layers)}, ratio {lam:.2f})"] = counts
        out[f"random/pool {k} (pre-LLM)"] = [k] * num_layers
    return out


def visipruner_schedule(num_layers: int, fusion: int, kept: int, quiet_after: int = 2, n_vis: int = 576):
    """Full image up to the fusion layer, ``kept`` critical tokens after it, none once the deep stage has
    seen ``quiet_after`` quiet layers (the earliest case: the first layers after fusion are quiet)."""
    drop = fusion + 1 + quiet_after
    return [n_vis if layer <= fusion else kept if layer < drop else 0 for layer in range(num_layers)]


ANALYTIC = {
    # shape: (visual tokens of one image, budgets, fraction note)
    "llava-1.5-7b": (576, (192, 128, 64)),
    "llava-next-7b": (2880, (640, 320, 160)),  # 5 tiles of 336 px (672x672 image); DART/VisionZip budgets
    "qwen2-vl-7b": (2500, (833, 556, 278)),  # a 1400x1400 image: 100x100 patches, 2x2 merged; 33/22/11 %
}


def build_meta(shape: str):
    """The real architecture on the meta device (no memory), with its family adapter."""
    from .. import patches as fam

    if shape == "llava-1.5-7b":
        return fam.llava.Family(build(shape, "meta"))
    if shape == "llava-next-7b":
        return fam.llava_next.Family(build(shape, "meta"))
    if shape == "qwen2-vl-7b":
        return fam.qwen2_vl.Family(build(shape, "meta"))
    raise ValueError(f"no analytic shape {shape!r}; known: {sorted(ANALYTIC)}")


def analytic_vision(fam, shape: str, n_vis: int) -> float:
    if shape == "llava-1.5-7b":
        return fam.vision_flops(torch.empty(1, 3, 336, 336, device="meta"))
    if shape == "llava-next-7b":
        return fam.tile_flops(5)
    patches = n_vis * fam.merge**2  # qwen: one image, full attention in every block
    width = fam.visual.blocks[0].attn.proj.in_features
    fam.attn_sq = 4 * width * patches * patches * len(fam.visual.blocks)
    return fam.patch_flops(patches, 3 * 2 * 14 * 14) + fam.attn_sq


def analytic(shape: str, n_text: int = 64, fusion_layers=(7, 9, 11, 13, 15), kept: int = 10) -> dict:
    from ..core.flops import DecoderCost

    fam = build_meta(shape)
    n_vis, budgets = ANALYTIC[shape]
    cost = DecoderCost.of(fam.layers, fam.text_config)
    nl = len(fam.layers)
    vision = analytic_vision(fam, shape, n_vis)
    rows = []
    scheds = schedules(nl, n_vis, budgets)
    for f in fusion_layers:
        if f >= nl:
            continue
        scheds[f"visipruner adaptive, fusion after layer {f}, {kept} kept"] = visipruner_schedule(
            nl, f, kept, n_vis=n_vis
        )
        low = budgets[-1]
        scheds[f"visipruner fixed {low}, fusion after layer {f} (deep off)"] = [
            n_vis if layer <= f else low for layer in range(nl)
        ]
    base_llm = None
    for name, sched in scheds.items():
        llm = cost.prefill(1, [n_text + v for v in sched], 1)
        base_llm = base_llm or llm
        rows.append(
            dict(
                schedule=name,
                mean_visual=sum(sched) / nl,
                llm_tflops=llm / 1e12,
                total_tflops=(llm + vision) / 1e12,
                llm_saved=1 - llm / base_llm,
                total_saved=1 - (llm + vision) / (base_llm + vision),
            )
        )
    return {
        "shape": shape,
        "visual_tokens": n_vis,
        "text_tokens": n_text,
        "vision_tflops": vision / 1e12,
        "rows": rows,
    }


def analytic_markdown(res: dict) -> str:
    lines = [
        f"Prefill FLOPs of {res['shape']} (batch 1, {res['visual_tokens']} visual + "
        f"{res['text_tokens']} text tokens, "
        f"logits of the last token only). Vision tower + projector: {res['vision_tflops']:.3f} TFLOPs.",
        "",
        md_row(
            "schedule",
            "mean visual tokens / layer",
            "LLM TFLOPs",
            "LLM saved",
            "whole model TFLOPs",
            "whole saved",
        ),
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            md_row(
                r["schedule"],
                f"{r['mean_visual']:.1f}",
                f"{r['llm_tflops']:.3f}",
                f"{100 * r['llm_saved']:.1f}%",
                f"{r['total_tflops']:.3f}",
                f"{100 * r['total_saved']:.1f}%",
            )
        )
    return "\n".join(lines)


def environment() -> dict:
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    env["machine"] = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    )
    env["threads"] = torch.get_num_threads()
    return env


def main(argv=None):
    from .loading import parser

    ap = parser("bench", __doc__)
    ap.add_argument(
        "--shape",
        default="tiny-cpu",
        choices=sorted(set(SHAPES) | set(ANALYTIC)),
        metavar="SHAPE",
        help=f"model shape (default tiny-cpu): {', '.join(sorted(set(SHAPES) | set(ANALYTIC)))}",
    )
    ap.add_argument("--analytic", action="store_true", help="FLOPs only, no model weights allocated")
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda if any)",
    )
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--batch", type=int, default=1, help="samples per prefill (default 1)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per row (default 5; median)")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: all of the grid)")
    ap.add_argument(
        "--budgets", default=None, help="comma-separated token budgets; 'adaptive' for visipruner's"
    )
    ap.add_argument(
        "--decode-tokens",
        type=int,
        default=16,
        help="k: the decode column times generate_fast of 1 + k against 1 token (default 16)",
    )
    ap.add_argument(
        "--e2e-tokens", type=int, default=0, help="also time prefill + N tokens: generate vs generate_fast"
    )
    ap.add_argument("--ragged", action="store_true", help="left-pad sample i by 2 * i tokens")
    ap.add_argument("--varlen", choices=["auto", "off"], default="auto", help="ragged kernel for padding")
    ap.add_argument("--var-tau", type=float, default=None, help="add a VAR row with this threshold")
    ap.add_argument(
        "--opt",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="method options (values as JSON), e.g. visipruner.mask_until_fallback=null for one method",
    )
    ap.add_argument("--out", default=None, help="directory for JSON and Markdown")
    ap.add_argument("--name", default=None, help="file stem (default: derived from the settings)")
    a = ap.parse_args(argv)
    if a.analytic:
        res = analytic(a.shape)
        md = analytic_markdown(res)
        stem = a.name or f"analytic_{a.shape}"
    else:
        dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
        grid = None
        if a.methods or a.budgets:
            methods = (a.methods or ",".join(m for m, _ in METHOD_GRID)).split(",")
            budgets = [None if b == "adaptive" else int(b) for b in (a.budgets or "192,128,64").split(",")]
            grid = [("none", None)] if "none" in methods else []  # keeps every token: no budget
            grid += [
                (m, b) for m in methods if m != "none" for b in budgets if b is not None or m == "visipruner"
            ]
        res = measure(
            a.shape,
            a.reps,
            a.batch,
            a.device,
            dtype,
            grid,
            a.decode_tokens,
            a.e2e_tokens,
            ragged=a.ragged,
            varlen=False if a.varlen == "off" else None,
            var_tau=a.var_tau,
            opts=a.opt,
            progress=lambda text: print(text, file=sys.stderr, flush=True),
        )
        md = measured_markdown(res)
        stem = a.name or f"prefill_{a.shape}_{a.device.split(':')[0]}_b{a.batch}"
    res["environment"] = environment()
    res["command"] = "mmsink bench " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
        env = res["environment"]
        header = f"Command: `{res['command']}`  \nMachine: {env['machine']}, torch {env['torch']}, "
        header += f"transformers {env['transformers']}\n\n"
        (out / f"{stem}.md").write_text(header + md + "\n")
    return res
