"""The vision tower quantized with and without RegCache on a synthvqa subset (issue 18).

Per setting (fp32, W8A8, W6A6, W4A8, W4A4; fake quantization: per-channel weights, per-image activations),
the answers' accuracy and the tower's output error (relative squared error of the projector's input against
the unquantized tower without registers), quantized alone, with RegCache curated on ``--calib`` training
images (label-free: sensitive block by output error, tau by the quantized output error) and, with
``--delete k``, RegCache plus the deletion of k patch tokens per image. Each invocation writes its rows to
``<out>/parts/<settings>.json`` and rebuilds ``regcache.json`` / ``regcache.md`` from every part there, so
settings can run as separate processes:

    python -m mmsink.evals.regcache --model models/synthllava --questions 300 --settings w8a8 --delete 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import mmsink
from mmsink.sinks import regcache
from mmsink.tools.loading import load_model, prompt_for

from .scorers import vqa_accuracy
from .synthvqa import make_questions, make_scenes, render_scene

SETTINGS = ("fp32", "w8a8", "w6a6", "w4a8", "w4a4")


def encode(processor, texts, images, dtype):
    enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    return enc


def run(model, processor, questions, answers, images, batch: int, **settings) -> dict:
    mmsink.wrap(model, **settings)
    preds, errs = [], []
    try:
        with torch.inference_mode():
            for s in range(0, len(questions), batch):
                qs = questions[s : s + batch]
                enc = encode(
                    processor,
                    [prompt_for(processor, q["text"]) for q in qs],
                    [images[q["image"]] for q in qs],
                    model.dtype,
                )
                out = model.generate(
                    **enc, max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
                )
                preds += processor.tokenizer.batch_decode(
                    out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                )
                feats = tower(model, enc["pixel_values"])
                with mmsink.disabled(model):
                    ref = tower(model, enc["pixel_values"])
                errs.append(((feats - ref).pow(2).mean() / ref.pow(2).mean()).item())
    finally:
        mmsink.unwrap(model)
    acc = [vqa_accuracy(p.strip(), str(a["answer"])) for p, a in zip(preds, answers, strict=True)]
    return {"accuracy": round(100 * sum(acc) / len(acc), 2), "vit_rel_error": sum(errs) / len(errs)}


def tower(model, pv):
    hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states
    return hs[model.config.vision_feature_layer].float()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/synthllava")
    p.add_argument("--questions", type=int, default=60)
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--delete", type=int, default=0, help="also RegCache + deletion of k tokens per image")
    p.add_argument("--out", default="evals/results/regcache")
    a = p.parse_args(argv)
    settings = a.settings.split(",")
    if any(b not in SETTINGS for b in settings):
        raise SystemExit(f"--settings: each of {SETTINGS}, got {a.settings!r}")
    model, processor = load_model(a.model, "cpu", "float32")
    scenes = make_scenes("test", a.questions, a.seed)
    questions, answers = make_questions(scenes, "test", a.seed, questions_per_scene=1)
    questions, answers = questions[: a.questions], answers[: a.questions]
    images = {q["image"]: render_scene(s) for q, s in zip(questions, scenes, strict=False)}
    calib_imgs = [render_scene(s) for s in make_scenes("train", a.calib, a.seed)]
    calib = [
        {
            "pixel_values": encode(
                processor,
                [prompt_for(processor, "?")] * len(calib_imgs[i : i + 8]),
                calib_imgs[i : i + 8],
                model.dtype,
            )["pixel_values"]
        }
        for i in range(0, a.calib, 8)
    ]
    t0 = time.time()
    rows, go = {}, lambda **kw: run(model, processor, questions, answers, images, a.batch, **kw)  # noqa: E731
    for bits in settings:
        if bits == "fp32":  # and the registers alone (curated for W8A8), unquantized: the prefix's own shift
            rows["fp32"] = {**go(), "tower_norms": tower_norms(model, calib)}
            for name, k in [("+regcache", 0)] + ([("+regcache+delete", a.delete)] if a.delete else []):
                rc = regcache.curate(model, calib, quant="w8a8", delete=k)
                info = {"sensitive_block": rc.sensitive, "tau": rc.tau, "delete": k}
                rows["fp32" + name] = {**go(regcache=rc), **info}
            continue
        rows[bits] = go(quant_vision=bits)
        for name, k in [("+regcache", 0)] + ([("+regcache+delete", a.delete)] if a.delete else []):
            rc = regcache.curate(model, calib, quant=bits, delete=k)
            rows[bits + name] = {
                **go(regcache=rc, quant_vision=bits),
                **{"sensitive_block": rc.sensitive, "tau": rc.tau, "delete": k, "curation": rc.report},
            }
        print(bits, {k: (v["accuracy"], v["vit_rel_error"]) for k, v in rows.items() if k.startswith(bits)})
    meta = {
        "command": "python -m mmsink.evals.regcache " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(a.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / "parts" / f"{'_'.join(settings)}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    write(out, a)


def tower_norms(model, calib) -> list:
    """Per block input on the calibration images: max / median token L2 norm and the largest |h|."""
    from mmsink.patches import family_for

    inputs, _ = regcache.block_inputs(regcache.parts_of(family_for(model)), calib)
    out = []
    for rows in inputs:
        n = rows.float().norm(dim=-1)
        out.append(
            {"max_over_median": round((n.max() / n.median()).item(), 3), "linf": rows.abs().max().item()}
        )
    return out


def write(out: Path, a) -> None:
    parts = [json.loads(f.read_text()) for f in sorted((out / "parts").glob("*.json"))]
    rows = {k: v for p in parts for k, v in p["rows"].items()}
    order = [s + t for s in SETTINGS for t in ("", "+regcache", "+regcache+delete")]
    rows = {k: rows[k] for k in order if k in rows}
    meta = {
        "model": a.model,
        "questions": a.questions,
        "calib_images": a.calib,
        "seed": a.seed,
        "quantizer": "fake RTN, symmetric; weights per output channel, activations per image (per tensor)",
        "runs": [p["meta"] for p in parts],
    }
    (out / "regcache.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# RegCache on {a.model} ({a.questions} synthvqa test questions, CPU)",
        "",
        f"Calibration: {a.calib} training images. {meta['quantizer']}.",
        "ViT output error: relative squared error of the projector's input against the fp32 tower without",
        "registers, mean over batches of 10 questions.",
        "",
        "| setting | accuracy % | ViT output rel. error | sensitive block | tau | deleted / image |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['accuracy']} | {r['vit_rel_error']:.3g} | "
            f"{r.get('sensitive_block', '')} | {r.get('tau', '')} | {r.get('delete', '')} |"
        )
    if "fp32" in rows:
        norms = rows["fp32"]["tower_norms"]
        lines += [
            "",
            "Tower, per block input (calibration images): max / median token norm, largest |h|:",
            "",
        ]
        lines += [f"- block {i}: {n['max_over_median']}, {n['linf']:.3g}" for i, n in enumerate(norms)]
    lines += ["", "Commands (each wrote one part):", ""] + [f"    {p['meta']['command']}" for p in parts]
    (out / "regcache.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
