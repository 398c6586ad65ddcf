"""The vision tower quantized with and without RegCache on a synthvqa subset (issue 18).

Per setting (W8A8, W6A6, W4A8, W4A4; fake quantization: per-channel weights, per-image activations), the
answers' accuracy and the tower's output error (relative squared error of the projector's input against
the unquantized tower without registers), quantized alone and with RegCache curated on ``--calib``
training images (label-free: sensitive block by output error, tau by the quantized output error).

    python -m mmsink.evals.regcache --model models/synthllava --questions 60 --calib 16 \
        --out evals/results/regcache
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mmsink
from mmsink.sinks import regcache
from mmsink.tools.loading import load_model, prompt_for

from .scorers import vqa_accuracy
from .synthvqa import make_questions, make_scenes, render_scene

SETTINGS = ("w8a8", "w6a6", "w4a8", "w4a4")


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
    p.add_argument("--out", default="evals/results/regcache")
    a = p.parse_args(argv)
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
    rows = {"fp32": run(model, processor, questions, answers, images, a.batch)}
    for bits in a.settings.split(","):
        rc = regcache.curate(model, calib, quant=bits)
        rows[bits] = run(model, processor, questions, answers, images, a.batch, quant_vision=bits)
        rows[bits + "+regcache"] = {
            **run(model, processor, questions, answers, images, a.batch, regcache=rc, quant_vision=bits),
            "sensitive_block": rc.sensitive,
            "tau": rc.tau,
            "curation": rc.report,
        }
        print(bits, rows[bits], {k: v for k, v in rows[bits + "+regcache"].items() if k != "curation"})
    write(Path(a.out), a, rows, time.time() - t0)


def write(out: Path, a, rows: dict, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": a.model,
        "questions": a.questions,
        "calib_images": a.calib,
        "seed": a.seed,
        "quantizer": "fake RTN, symmetric; weights per output channel, activations per image (per tensor)",
        "seconds": round(seconds, 1),
    }
    (out / "regcache.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# RegCache on {a.model} ({a.questions} synthvqa test questions, CPU)",
        "",
        f"Calibration: {a.calib} training images. {meta['quantizer']}.",
        "",
        "| setting | accuracy | ViT output rel. error | sensitive block | tau |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['accuracy']} | {r['vit_rel_error']:.3g} | "
            f"{r.get('sensitive_block', '')} | {r.get('tau', '')} |"
        )
    (out / "regcache.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
