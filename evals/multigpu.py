"""Two GPUs, measured: data-parallel evaluation and a model sharded with ``device_map`` (one table).

    python -m evals.multigpu dp --work /tmp/mg --out dp.json        # 7B-shaped eval, 1 vs 2 processes
    python -m evals.multigpu shard --work /tmp/mg --out shard.json  # NeXT-7B split over 2 GPUs vs one
    python -m evals.multigpu table dp.json shard.json --out evals/results/multigpu

``dp``: a LLaVA-1.5-7B-shaped checkpoint (random weights, bf16; the reference model's tokenizer and chat
template, 336 px, 576 visual tokens) is saved once under ``--work``; ``mmsink eval`` answers the same
synthvqa questions in one process, then in two (torchrun, NCCL, one GPU each). Reported: each run's
answering time (the eval's own "answering" line: model loading excluded), wall time, questions per
second, and whether the two answers files are byte-identical.

``shard``: a LLaVA-NeXT-7B-shaped checkpoint (random weights) loaded twice in fp32, on one GPU and with
its decoder layers split over two (``device_map``, as ``device_map="auto"`` splits a model too big for
one GPU); a prompt with ``--images`` 672x672 images. For every method: greedy tokens and kept tokens of
the split model == the one-GPU model's (fp32). Then both in bf16: time to first token (``generate`` with
one new token) split against one GPU, alternated; and ``generate_fast``'s decode ms per token on one GPU
(CUDA graphs on / off) against the split model.

``--shape tiny`` runs everything at CPU size (both "GPUs" are the CPU) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REF = Path(__file__).resolve().parent.parent / "models" / "synthllava"
FRACTION = 0.11  # 320 of NeXT's 2928 visual tokens per 672x672 image
METHODS = [
    ("none", {}),
    ("fastv", dict(budget=FRACTION)),
    ("pdrop", {}),
    ("dart", dict(budget=FRACTION)),
    ("visipruner", dict(budget=FRACTION)),
    ("visipruner", {}),  # adaptive
    ("visionzip", dict(budget=FRACTION)),
    ("divprune", dict(budget=FRACTION)),
    ("cdpruner", dict(budget=FRACTION)),
    ("scope", dict(budget=FRACTION)),
    ("sparsevlm", dict(budget=FRACTION)),
    ("vispruner_iccv", dict(budget=FRACTION)),
    ("none", dict(var="dims")),  # VAR at tau 3 on LLaVA-1.5-7B's sink channels (random weights: few pass 20)
    ("fastv", dict(budget=FRACTION, var="dims")),
    ("fastv", dict(budget=FRACTION, sink_forward=True)),
]
FAST = [("none", {}), ("fastv", dict(budget=FRACTION)), ("visionzip", dict(budget=FRACTION))]


def say(msg: str) -> None:
    print(f"[multigpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def resolve(opts: dict, hidden: int) -> dict:
    if opts.get("var") != "dims":
        return opts
    return {**opts, "var": dict(sink_dims=(1415, 2533) if hidden >= 4096 else (3, 7), tau=3.0)}


def label(method: str, opts: dict) -> str:
    extra = [k if v is True or k == "var" else f"{k}={v}" for k, v in opts.items()]
    return method + (f" ({', '.join(extra)})" if extra else "")


# ----------------------------------------------------------------------------- data-parallel eval


def make_llava(path: Path, tiny: bool) -> None:
    """A LLaVA-1.5-7B-shaped checkpoint with the reference tokenizer / chat template (random weights)."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from .reference_model import IMAGE_TOKEN, build_processor

    if (path / "config.json").exists():
        return
    tok = AutoTokenizer.from_pretrained(REF)
    v = (64, 2, 2) if tiny else (1024, 24, 16)
    t = (128, 2, 4, 256) if tiny else (4096, 32, 32, 11008)
    vision = CLIPVisionConfig(
        hidden_size=v[0],
        intermediate_size=4 * v[0],
        num_hidden_layers=v[1],
        num_attention_heads=v[2],
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=t[0],
        num_hidden_layers=t[1],
        num_attention_heads=t[2],
        num_key_value_heads=t[2],
        intermediate_size=t[3],
        vocab_size=len(tok),
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    with torch.device("cuda:0" if torch.cuda.is_available() else "cpu"):
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    build_processor(tok, image_size=336).save_pretrained(path)
    del model


def eval_run(model: Path, work: Path, name: str, procs: int, args, limit=None) -> dict:
    argv = ["-m", "mmsink", "eval", "--model", str(model), "--scenes", str(args.scenes)]
    argv += ["--limit", str(limit)] if limit else []
    argv += ["--cache", str(work / "cache"), "--batch-size", str(args.batch_size), "--no-progress"]
    argv += ["--max-new-tokens", "8", "--dtype", "bfloat16", "--out", str(work / f"{name}.jsonl")]
    argv += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    if procs > 1 and torch.cuda.is_available():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), *argv]
    else:
        cmd = [sys.executable, *argv] + (["--num-processes", str(procs)] if procs > 1 else [])
    (work / f"{name}.jsonl").unlink(missing_ok=True)
    say(f"{name}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    found = re.findall(r"answering: ([\d.]+) s", done.stderr)
    answering = float(found[-1]) if found else float("nan")
    n = sum(1 for _ in open(work / f"{name}.jsonl"))
    say(f"{name}: {n} answers, answering {answering:.1f} s, wall {wall:.1f} s")
    return dict(processes=procs, questions=n, answering_s=answering, wall_s=wall, q_per_s=n / answering)


def dp(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / ("llava7b" if not args.tiny else "llava_tiny")
    say("making the checkpoint")
    t0 = time.perf_counter()
    make_llava(model, args.tiny)
    say(f"checkpoint ready ({time.perf_counter() - t0:.0f} s)")
    warm = eval_run(model, work, "warm", 1, args, limit=2 * args.batch_size)  # question cache, page cache
    one = eval_run(model, work, "one", 1, args)
    two = eval_run(model, work, "two", 2, args)
    same = (work / "one.jsonl").read_bytes() == (work / "two.jsonl").read_bytes()
    eval_run(model, work, "again", 1, args, limit=10 * args.batch_size)  # run to run, one process
    a, b, c = (answers(work / f"{x}.jsonl") for x in ("one", "two", "again"))
    differ = [dict(question_id=q, one=a[q], two=b.get(q)) for q in a if a[q] != b.get(q)]
    again_differ = [q for q in c if c[q] != a.get(q)]
    return dict(
        model="LLaVA-1.5-7B shape (random weights, bf16)" if not args.tiny else "tiny",
        batch_size=args.batch_size,
        warmup=warm,
        runs=[one, two],
        speedup_answering=one["answering_s"] / two["answering_s"],
        speedup_wall=one["wall_s"] / two["wall_s"],
        answers_identical=same,
        answers_differing=len(differ),
        differing=differ[:20],
        one_process_again=dict(questions=len(c), differing_from_first=len(again_differ)),
    )


def answers(path: Path) -> dict:
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    return {r["question_id"]: r["text"] for r in recs}


# ----------------------------------------------------------------------------- sharded model


def split_map(layers: int, first: int, head, tail) -> dict:
    lm = "model.language_model"
    dm = {"model.vision_tower": head, "model.multi_modal_projector": head, "model.image_newline": head}
    dm.update({f"{lm}.embed_tokens": head, f"{lm}.rotary_emb": head, f"{lm}.norm": tail, "lm_head": tail})
    dm.update({f"{lm}.layers.{i}": head if i < first else tail for i in range(layers)})
    return dm


def prompt(model, images: int, device, dtype) -> dict:
    """One prompt: a system part, then per image its visual tokens and a sentence, then a question."""
    from mmsink.tools.bench import IMAGE_TOKEN

    g = torch.Generator().manual_seed(0)
    pix = torch.randn(images, 5, 3, 336, 336, generator=g)
    sizes = torch.tensor([[672, 672]] * images)
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=pix[:1].to(device, dtype), image_sizes=sizes[:1].to(device), return_dict=True
        )
    n_vis = feats.pooler_output[0].shape[0]
    parts = [torch.tensor([1]), torch.randint(3, 30000, (35,), generator=g)]
    for _ in range(images):
        parts += [torch.full((n_vis,), IMAGE_TOKEN), torch.randint(3, 30000, (20,), generator=g)]
    ids = torch.cat(parts)[None]
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pix.to(device, dtype),
        "image_sizes": sizes.to(device),
    }


def sync() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def load_pair(path: Path, layers: int, dtype, tiny: bool):
    from transformers import LlavaNextForConditionalGeneration

    gpus = ("cpu", "cpu") if tiny else (0, 1)
    one = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map={"": gpus[0]})
    split = LlavaNextForConditionalGeneration.from_pretrained(
        path, dtype=dtype, device_map=split_map(layers, layers // 2, *gpus)
    )
    for m in (one, split):
        m.eval().set_attn_implementation("sdpa")
    return one, split


def shard(args) -> dict:
    import mmsink
    from mmsink.tools import bench

    work = Path(args.work)
    shape = "tiny-next-cpu" if args.tiny else "llava-next-7b"
    path = work / shape
    if not (path / "config.json").exists():
        say(f"making the {shape} checkpoint")
        torch.manual_seed(0)
        m = bench.build(shape, device="cuda:0" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
        m.save_pretrained(path)
        del m
    layers = bench.SHAPES[shape]["text"]["num_hidden_layers"]
    dev = "cpu" if args.tiny else "cuda:0"
    if args.only_fast:
        say("loading bf16 on one GPU and split over two")
        one, split = load_pair(path, layers, torch.bfloat16, args.tiny)
        inputs = prompt(one, args.images, dev, torch.bfloat16)
        return dict(
            prompt_tokens=inputs["input_ids"].shape[1], generate_fast=fast_decode(one, split, inputs, args)
        )
    say("loading fp32 on one GPU and split over two")
    one, split = load_pair(path, layers, torch.float32, args.tiny)
    inputs = prompt(one, args.images, dev, torch.float32)
    n_prompt = inputs["input_ids"].shape[1]
    say(f"prompt: {n_prompt} tokens, {args.images} images")
    rows = []
    hidden = one.config.text_config.hidden_size
    methods = [(m, resolve(o, hidden)) for m, o in METHODS]
    for method, opts in methods:
        outs = []
        for m in (one, split):
            mmsink.wrap(m, prune=method, **opts)
            try:
                with torch.no_grad():
                    tok = m.generate(**inputs, do_sample=False, max_new_tokens=args.new_tokens)
                outs.append((tok.cpu(), mmsink.stats(m)))
            finally:
                mmsink.unwrap(m)
        (a, sa), (b, sb) = outs
        row = dict(
            method=label(method, opts),
            tokens_equal=bool(torch.equal(a, b)),
            kept_equal=sa.kept_tokens == sb.kept_tokens,
            kept_tokens=sa.kept_tokens,
            new_tokens=int(a.shape[1] - n_prompt),
        )
        rows.append(row)
        say(f"fp32 {row['method']}: tokens equal {row['tokens_equal']}, kept equal {row['kept_equal']}")
    Path(args.out).write_text(json.dumps(dict(rows=rows, partial=True), indent=1) + "\n")
    say("bf16: time to first token, split vs one GPU (alternated)")
    for m in (one, split):
        m.to(torch.bfloat16)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    for row, (method, opts) in zip(rows, methods):
        times = {0: [], 1: []}
        for rep in range(args.reps + 1):
            for i, m in enumerate((one, split)):
                mmsink.wrap(m, prune=method, **opts)
                try:
                    with torch.no_grad():
                        t = timed(lambda m=m: m.generate(**inputs, do_sample=False, max_new_tokens=1))
                finally:
                    mmsink.unwrap(m)
                if rep:  # the first round warms up
                    times[i].append(t)
        row["ttft_one_ms"] = 1e3 * statistics.median(times[0])
        row["ttft_split_ms"] = 1e3 * statistics.median(times[1])
        say(
            f"bf16 {row['method']}: TTFT one {row['ttft_one_ms']:.1f} ms, split {row['ttft_split_ms']:.1f} ms"
        )
    Path(args.out).write_text(json.dumps(dict(rows=rows, partial=True), indent=1) + "\n")
    fast = fast_decode(one, split, inputs, args)
    return dict(
        model=f"{shape} (random weights)",
        prompt_tokens=n_prompt,
        images=args.images,
        split=f"tower + layers 0-{layers // 2 - 1} on GPU 0, "
        f"layers {layers // 2}-{layers - 1} + head on GPU 1",
        new_tokens_fp32=args.new_tokens,
        rows=rows,
        generate_fast=fast,
    )


def fast_decode(one, split, inputs, args) -> list:
    """generate_fast decode ms / token: (time of 1 + N new tokens - time of 1) / N, medians, alternated."""
    import mmsink

    n = args.decode_tokens
    on = None if args.tiny else True  # CPU: no graphs
    cases = [
        ("one GPU, graphs", one, on),
        ("one GPU, no graphs", one, False),
        ("split, no graphs", split, False),
        ("split, one graph per GPU", split, on),
    ]
    out = []
    for method, opts in FAST:
        times = {c[0]: {1: [], n + 1: []} for c in cases}
        tokens = {}
        for m in (one, split):  # wrapped once: the decoders (and their graphs) are kept between calls
            mmsink.wrap(m, prune=method, **opts)
        try:
            for rep in range(args.reps + 1):
                for name, m, graphs in cases:
                    for k in (1, n + 1):
                        run = lambda m=m, k=k, g=graphs: mmsink.generate_fast(  # noqa: E731
                            m, max_new_tokens=k, graphs=g, compile=False, **inputs
                        )
                        t = timed(run)
                        if rep:  # the first round warms up (captures graphs)
                            times[name][k].append(t)
                        if k > 1 and rep == 0:
                            tokens[name] = run().cpu()
        finally:
            for m in (one, split):
                mmsink.unwrap(m)
        for name, _, _ in cases:
            t1, tn = statistics.median(times[name][1]), statistics.median(times[name][n + 1])
            same = [c for c, _, _ in cases if torch.equal(tokens[name], tokens[c]) and c != name]
            out.append(
                dict(
                    method=label(method, opts),
                    case=name,
                    ttft_ms=1e3 * t1,
                    decode_ms_per_token=1e3 * (tn - t1) / n,
                    new_tokens=int(tokens[name].shape[1] - inputs["input_ids"].shape[1]),
                    same_tokens_as=same,
                )
            )
            ms = out[-1]["decode_ms_per_token"]
            say(f"generate_fast {label(method, opts)} {name}: {ms:.2f} ms/token, same as {same}")
    return out


# ----------------------------------------------------------------------------- table


def table(paths: list[str], out: str) -> str:
    lines = []
    for p in paths:
        r = json.loads(Path(p).read_text())
        if "runs" in r:
            lines += [f"Data-parallel `mmsink eval`, {r['model']}, batch {r['batch_size']}:", ""]
            lines += ["| processes | questions | answering s | q/s | wall s |", "|---|---|---|---|---|"]
            for x in r["runs"]:
                lines.append(
                    f"| {x['processes']} | {x['questions']} | {x['answering_s']:.1f} | {x['q_per_s']:.1f} "
                    f"| {x['wall_s']:.1f} |"
                )
            lines += [
                "",
                f"Speed-up {r['speedup_answering']:.2f}x answering ({r['speedup_wall']:.2f}x wall); "
                f"answers files identical: {r['answers_identical']}.",
                "",
            ]
        else:
            lines += [
                f"{r['model']}, {r['prompt_tokens']}-token prompt ({r['images']} images); {r['split']}:",
                "",
            ]
            head = "| method | tokens == one GPU (fp32) | kept == | TTFT one GPU ms | TTFT split ms |"
            lines += [head + " split / one |"]
            lines += ["|---|---|---|---|---|---|"]
            for x in r["rows"]:
                lines.append(
                    f"| {x['method']} | {x['tokens_equal']} | {x['kept_equal']} | {x['ttft_one_ms']:.1f} "
                    f"| {x['ttft_split_ms']:.1f} | {x['ttft_split_ms'] / x['ttft_one_ms']:.2f} |"
                )
            lines += ["", "| generate_fast | placement | TTFT ms | decode ms / token | same bf16 tokens as |"]
            lines += ["|---|---|---|---|---|"]
            for x in r["generate_fast"]:
                lines.append(
                    f"| {x['method']} | {x['case']} | {x['ttft_ms']:.1f} | {x['decode_ms_per_token']:.2f} "
                    f"| {', '.join(x['same_tokens_as']) or '-'} |"
                )
            lines.append("")
    text = "\n".join(lines)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "table.md").write_text(text + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.multigpu", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["dp", "shard", "table"])
    p.add_argument("inputs", nargs="*", help="table: result JSON files")
    p.add_argument("--work", default="/tmp/mmsink-multigpu", help="checkpoints and answers files")
    p.add_argument("--out", required=True, help="result JSON (table: a folder)")
    p.add_argument("--tiny", action="store_true", help="CPU-size shapes, to check the script")
    p.add_argument("--scenes", type=int, default=334, help="dp: synthvqa scenes (3 questions each)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=2, help="shard: 672x672 images in the prompt")
    p.add_argument("--new-tokens", type=int, default=8, help="shard: greedy tokens compared in fp32")
    p.add_argument("--decode-tokens", type=int, default=32, help="shard: generate_fast tokens timed")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only-fast", action="store_true", help="shard: the generate_fast timings alone (bf16)")
    args = p.parse_args(argv)
    if args.what == "table":
        print(table(args.inputs, args.out))
        return 0
    result = dp(args) if args.what == "dp" else shard(args)
    result.update(
        command=" ".join(["python -m evals.multigpu", *(argv if argv is not None else sys.argv[1:])]),
        torch=torch.__version__,
        gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    )
    import transformers

    result["transformers"] = transformers.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
