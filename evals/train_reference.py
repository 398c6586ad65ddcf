"""Train the reference model on the synthetic VQA benchmark (runs on the GPU machine in a few minutes).

    python -m evals.train_reference --out models/synthllava --train-scenes 30000 --steps 4000

Everything is seeded. Writes the model (bf16 safetensors, sharded under 16 MB), the processor, and
``training.json`` (command, loss curve, validation accuracy, final test and noise-image accuracy).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from .reference_model import SYSTEM, build_config, build_processor, build_tokenizer, prompt_text
from .scorers import normalize_answer
from .synthvqa import BACKGROUNDS, CATEGORIES, COLORS, SHAPES, generate, render_scene

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def render_all(scenes, workers: int) -> np.ndarray:
    if workers > 1:
        with Pool(workers) as pool:
            images = pool.map(render_scene, scenes, chunksize=64)
    else:
        images = [render_scene(s) for s in scenes]
    return np.stack([np.asarray(im, dtype=np.uint8) for im in images])


def split_data(name, n, seed, qps, workers):
    d = generate(name, n, seed=seed, questions_per_scene=qps)
    index = {s.scene_id: i for i, s in enumerate(d.scenes)}
    img_of = [index[q["image"][:-4]] for q in d.questions]
    return d, render_all(d.scenes, workers), img_of


def pixels(uint8_images: np.ndarray, device) -> torch.Tensor:
    x = torch.from_numpy(uint8_images).to(device).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN.to(device)[:, None, None]) / STD.to(device)[:, None, None]


def encode_examples(tokenizer, questions, answers, n_image_tokens):
    """Token ids and labels (answer tokens + </s> only) of each question, prompts as the processor builds
    them (the image placeholder expanded in place)."""
    expanded = [prompt_text(q["text"]).replace("<image>", "<image>" * n_image_tokens) for q in questions]
    prompts = tokenizer(expanded, add_special_tokens=True)["input_ids"]
    ans = tokenizer([" " + a["answer"] for a in answers], add_special_tokens=False)["input_ids"]
    ids = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, ans)]
    labels = [[-100] * len(p) + a + [tokenizer.eos_token_id] for p, a in zip(prompts, ans)]
    return ids, labels


def padded(ids, labels, pad_id, device):
    """All examples right-padded into device tensors once (batches are then index selects)."""
    n = max(map(len, ids))
    x = torch.full((len(ids), n), pad_id, dtype=torch.long)
    y = torch.full((len(ids), n), -100, dtype=torch.long)
    for i, (a, b) in enumerate(zip(ids, labels)):
        x[i, : len(a)] = torch.tensor(a)
        y[i, : len(b)] = torch.tensor(b)
    return x.to(device), (x != pad_id).long().to(device), y.to(device)


def patch_labels(scenes, grid: int, size: int = 224):
    """Per-patch targets for vision pre-training: colour, shape and digit under each patch centre
    (0 = none), plus the background class and the number of objects of each scene."""
    colors, shapes, bgs = list(COLORS), list(SHAPES), list(BACKGROUNDS)
    step = size / grid
    c = (np.arange(grid) + 0.5) * step
    cy, cx = np.meshgrid(c, c, indexing="ij")
    col = np.zeros((len(scenes), grid, grid), np.int64)
    shp = np.zeros_like(col)
    dig = np.zeros_like(col)
    for i, s in enumerate(scenes):
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
            col[i][inside] = colors.index(o.color) + 1
            shp[i][inside] = shapes.index(o.shape) + 1
        for d in s.digits:
            x0, y0, x1, y1 = d.bbox
            dig[i][(cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)] = d.value + 1
    bg = np.array([bgs.index(s.background.name) for s in scenes])
    count = np.array([len(s.objects) for s in scenes])
    flat = [torch.from_numpy(a.reshape(len(scenes), -1)) for a in (col, shp, dig)]
    return (*flat, torch.from_numpy(bg), torch.from_numpy(count))


def pretrain_vision(model, images_u8, labels, steps, batch, lr, device, log):
    """Dense supervised pre-training of the vision tower on the features the projector reads (a stand-in
    for CLIP pre-training, which a from-scratch model does not have). The heads are thrown away."""
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    heads = torch.nn.ModuleDict(
        {
            "color": torch.nn.Linear(width, len(COLORS) + 1),
            "shape": torch.nn.Linear(width, len(SHAPES) + 1),
            "digit": torch.nn.Linear(width, 11),
            "bg": torch.nn.Linear(width, len(BACKGROUNDS)),
            "count": torch.nn.Linear(width, 10),
        }
    ).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    col, shp, dig, bg, cnt = (t.to(device) for t in labels)
    rng = np.random.default_rng(1)
    ce = torch.nn.functional.cross_entropy
    layer = model.config.vision_feature_layer
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = torch.from_numpy(rng.integers(0, len(images_u8), batch))
        pix = pixels(images_u8[rows.numpy()], device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            h = tower(pix, output_hidden_states=True).hidden_states[layer]
            r = rows.to(device)
            patch, cls = h[:, 1:], h[:, 0]
            loss = (
                ce(heads["color"](patch).flatten(0, 1).float(), col[r].flatten())
                + ce(heads["shape"](patch).flatten(0, 1).float(), shp[r].flatten())
                + ce(heads["digit"](patch).flatten(0, 1).float(), dig[r].flatten())
                + ce(heads["bg"](cls).float(), bg[r])
                + ce(heads["count"](cls).float(), cnt[r].clamp(max=9))
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0:
            log.append({"stage": "vision", "step": step, "loss": loss.item()})
            print(f"vision step {step} loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def answer(model, processor, images_u8, questions, img_of, device, batch=128, noise=False, seed=0):
    """Greedy answers for ``questions`` (left-padded batches through the processor's tokenizer)."""
    tok = processor.tokenizer
    n_img = model.config.image_seq_length
    out = []
    g = torch.Generator(device="cpu").manual_seed(seed)
    for s in range(0, len(questions), batch):
        qs = questions[s : s + batch]
        texts = [prompt_text(q["text"]).replace("<image>", "<image>" * n_img) for q in qs]
        enc = tok(texts, return_tensors="pt", padding=True).to(device)
        pix = pixels(images_u8[[img_of[s + i] for i in range(len(qs))]], device)
        if noise:
            pix = torch.randn(pix.shape, generator=g).to(device)
        gen = model.generate(**enc, pixel_values=pix.to(model.dtype), max_new_tokens=6, do_sample=False)
        out += [
            t.strip() for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
    return out


def accuracy(preds, answers) -> dict:
    per = {c: [0, 0] for c in CATEGORIES}
    for p, a in zip(preds, answers):
        per[a["category"]][0] += normalize_answer(p) == normalize_answer(a["answer"])
        per[a["category"]][1] += 1
    total = sum(v[0] for v in per.values()) / max(sum(v[1] for v in per.values()), 1)
    return {"overall": total, **{c: v[0] / max(v[1], 1) for c, v in per.items() if v[1]}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-scenes", type=int, default=30000)
    ap.add_argument("--val-scenes", type=int, default=300)
    ap.add_argument("--test-scenes", type=int, default=700)
    ap.add_argument("--questions-per-scene", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--vision-steps", type=int, default=1500)
    ap.add_argument("--vision-batch", type=int, default=256)
    ap.add_argument("--size", default="base")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=1e9, help="stop training early past this")
    ap.add_argument(
        "--state",
        default=None,
        help="folder for a resumable training state: a run that finds one there continues from it "
        "(chain several runs on one machine; each saves its state when it stops)",
    )
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    t0 = time.time()
    train, train_img, train_of = split_data("train", a.train_scenes, a.seed, a.questions_per_scene, a.workers)
    val, val_img, val_of = split_data("val", a.val_scenes, a.seed, 3, a.workers)
    test, test_img, test_of = split_data("test", a.test_scenes, a.seed, 3, a.workers)
    corpus = [
        SYSTEM + " USER: \n" + q["text"] + " ASSISTANT: " + ans["answer"]
        for q, ans in zip(train.questions, train.answers)
    ]
    tokenizer = build_tokenizer(corpus)
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, size=a.size)
    config.text_config._attn_implementation = "sdpa"
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config).to(device)
    model.set_attn_implementation("sdpa")
    ids, labels = encode_examples(tokenizer, train.questions, train.answers, config.image_seq_length)
    n_train = len(ids)
    all_x, all_m, all_y = padded(ids, labels, tokenizer.pad_token_id, device)
    grid = config.vision_config.image_size // config.vision_config.patch_size
    print(
        f"data ready in {time.time() - t0:.0f}s: {n_train} train questions, vocab {len(tokenizer)}",
        flush=True,
    )
    curve, val_curve = [], []
    state_file = Path(a.state) / "state.pt" if a.state else None
    resumed = state_file is not None and state_file.exists()
    t_vis = time.time()
    if a.vision_steps and not resumed:
        vlabels = patch_labels(train.scenes, grid)
        pretrain_vision(model, train_img, vlabels, a.vision_steps, a.vision_batch, a.lr * 2, device, curve)
    vision_seconds = time.time() - t_vis
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, 0.98),
        fused=device == "cuda",
    )

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        return a.lr * 0.5 * (1 + math.cos(math.pi * (step - a.warmup) / max(1, a.steps - a.warmup)))

    rng = np.random.default_rng(a.seed)
    start = 0
    if resumed:
        st = torch.load(state_file, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        rng.bit_generator.state = st["rng"]
        start, curve, val_curve = st["step"], st["curve"], st["val_curve"]
        print(f"resumed at step {start}", flush=True)
    img_index = torch.tensor(train_of)
    t_train = time.time()
    step = start - 1
    for step in range(start, a.steps):
        model.train()
        rows = torch.from_numpy(rng.integers(0, n_train, a.batch))
        r = rows.to(device)
        width = int(all_m[r].sum(1).max())
        x, m, y = all_x[r, :width], all_m[r, :width], all_y[r, :width]
        pix = pixels(train_img[img_index[rows].numpy()], device)
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=x, attention_mask=m, pixel_values=pix, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            curve.append(
                {
                    "stage": "llm",
                    "step": step,
                    "loss": loss.item(),
                    "lr": lr_at(step),
                    "s": time.time() - t_train,
                }
            )
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t_train:.0f}s)", flush=True)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            model.eval()
            acc = accuracy(answer(model, processor, val_img, val.questions, val_of, device), val.answers)
            val_curve.append({"step": step + 1, **acc})
            print(f"val @ {step + 1}: {json.dumps({k: round(v, 3) for k, v in acc.items()})}", flush=True)
        if (time.time() - t_train) / 60 > a.max_minutes:
            print(f"stopping at step {step + 1}: time limit", flush=True)
            break
    if state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "rng": rng.bit_generator.state,
                "step": step + 1,
                "curve": curve,
                "val_curve": val_curve,
            },
            state_file,
        )
    model.eval()
    test_acc = accuracy(answer(model, processor, test_img, test.questions, test_of, device), test.answers)
    noise_acc = accuracy(
        answer(model, processor, test_img, test.questions, test_of, device, noise=True), test.answers
    )
    print("test", json.dumps({k: round(v, 3) for k, v in test_acc.items()}), flush=True)
    print("noise", json.dumps({k: round(v, 3) for k, v in noise_acc.items()}), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="15MB")
    processor.save_pretrained(out)
    report = {
        "command": "python -m evals.train_reference "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "parameters": n_params,
        "steps_done": step + 1,
        "train_questions": n_train,
        "vision_pretrain_steps": a.vision_steps,
        "vision_pretrain_seconds": vision_seconds,
        "train_seconds": time.time() - t_train,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "loss_curve": curve,
        "val_curve": val_curve,
        "test_accuracy": test_acc,
        "noise_image_accuracy": noise_acc,
        "test_questions": len(test.questions),
    }
    (out / "training.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
