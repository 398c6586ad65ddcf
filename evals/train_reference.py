"""Train the reference model on the synthetic VQA benchmark (runs on the GPU machine in minutes).

    python -m mmsink.evals.train_reference --out models/synthllava --train-scenes 50000 --minutes 7

Two stages, as LLaVA-1.5 is built: the vision tower is pre-trained first (dense per-patch labels stand in
for CLIP pre-training, which a from-scratch tower lacks), then frozen, and the projector and language
model are trained on multi-turn conversations (every question of a scene in one sequence, as LLaVA's
instruction data is laid out), so one forward pass supervises several answers. The frozen tower's
features are computed once. ``--init DIR`` continues from a saved model (a second chained run).

Everything is seeded; with ``--minutes`` the learning-rate schedule follows elapsed time (the step count
then depends on the machine). Writes the model (bf16 safetensors, shards under 16 MB), the processor and
``training.json`` (command, loss curve, validation accuracy, test and noise-image accuracy).
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
from .synthvqa import (
    BACKGROUNDS,
    CATEGORIES,
    COLORS,
    SHAPES,
    digit_pool,
    generate,
    make_questions,
    make_scene,
    render_scene,
)

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
CHUNK = 2000


def render_all(scenes, workers: int) -> np.ndarray:
    if workers > 1:
        with Pool(workers) as pool:
            images = pool.map(render_scene, scenes, chunksize=64)
    else:
        images = [render_scene(s) for s in scenes]
    return np.stack([np.asarray(im, dtype=np.uint8) for im in images])


def _train_chunk(job):
    """Scenes lo..hi of the train split (the same streams as ``make_scenes``), their questions and pixels.
    Questions are balanced within the chunk, which lets chunks be built in parallel."""
    seed, lo, hi, qps = job
    pool = digit_pool("train")
    scenes = [
        make_scene(np.random.default_rng([seed, 0, i]), f"train_{i:05d}", pool=pool) for i in range(lo, hi)
    ]
    questions, answers = make_questions(scenes, "train", seed * 1_000_003 + lo, qps)
    images = np.stack([np.asarray(render_scene(s), dtype=np.uint8) for s in scenes])
    return scenes, questions, answers, images


def train_split(n, seed, qps, workers):
    jobs = [(seed, lo, min(lo + CHUNK, n), qps) for lo in range(0, n, CHUNK)]
    if workers > 1:
        with Pool(workers) as pool:
            parts = pool.map(_train_chunk, jobs)
    else:
        parts = [_train_chunk(j) for j in jobs]
    scenes = [s for p in parts for s in p[0]]
    questions = [q for p in parts for q in p[1]]
    answers = [a for p in parts for a in p[2]]
    return scenes, questions, answers, np.concatenate([p[3] for p in parts])


def split_data(name, n, seed, qps, workers):
    d = generate(name, n, seed=seed, questions_per_scene=qps)
    index = {s.scene_id: i for i, s in enumerate(d.scenes)}
    img_of = [index[q["image"][:-4]] for q in d.questions]
    return d, render_all(d.scenes, workers), img_of


def pixels(uint8_images, device) -> torch.Tensor:
    x = torch.as_tensor(uint8_images).to(device).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN.to(device)[:, None, None]) / STD.to(device)[:, None, None]


def encode_conversations(tokenizer, scenes, questions, answers, rng, n_image_tokens):
    """One multi-turn sequence per scene holding all its questions in a random order, tokenised as the
    chat template lays them out; labels are the answer tokens and each turn's ``</s>``."""
    by_scene: dict[str, list[int]] = {}
    for k, q in enumerate(questions):
        by_scene.setdefault(q["image"][:-4], []).append(k)
    orders = []
    for s in scenes:
        order = by_scene.get(s.scene_id, [])
        orders.append([order[j] for j in rng.permutation(len(order))])
    first = {o[0] for o in orders if o}
    # Batched tokenisation (one call per kind of piece): per-piece calls dominate at 50k scenes.
    heads = [
        prompt_text(q["text"]).replace("<image>", "<image>" * n_image_tokens)
        if k in first
        else f" USER: {q['text']} ASSISTANT:"
        for k, q in enumerate(questions)
    ]
    firsts = sorted(first)
    rest = [k for k in range(len(questions)) if k not in first]
    head_ids = [None] * len(questions)
    for keys, special in ((firsts, True), (rest, False)):
        enc = tokenizer([heads[k] for k in keys], add_special_tokens=special)["input_ids"] if keys else []
        for k, e in zip(keys, enc):
            head_ids[k] = e
    eos = tokenizer.eos_token_id
    ans_ids = tokenizer([" " + a["answer"] for a in answers], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for order in orders:
        x, y = [], []
        for k in order:
            a = ans_ids[k] + [eos]
            x += head_ids[k] + a
            y += [-100] * len(head_ids[k]) + a
        ids.append(x)
        labels.append(y)
    return ids, labels


def padded(ids, labels, pad_id, device):
    """All sequences right-padded into device tensors once (batches are then index selects)."""
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


def pretrain_vision(model, images, labels, steps, batch, lr, device, log):
    """Dense supervised pre-training of the vision tower on the features the projector reads (a stand-in
    for CLIP pre-training). ``images`` is a uint8 tensor on ``device``. The heads are thrown away."""
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
    gen = torch.Generator(device="cpu").manual_seed(1)
    ce = torch.nn.functional.cross_entropy
    layer = model.config.vision_feature_layer
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        r = torch.randint(0, len(images), (batch,), generator=gen).to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            h = tower(pixels(images[r], device), output_hidden_states=True).hidden_states[layer]
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
        if step % 100 == 0 or step == steps - 1:
            log.append({"stage": "vision", "step": step, "loss": loss.item()})
            print(f"vision step {step} loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def vision_features(model, images, device, batch=512) -> torch.Tensor:
    """The frozen tower's selected-layer patch features (what the projector reads), bf16 on device."""
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    out = []
    for s in range(0, len(images), batch):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            h = tower(pixels(images[s : s + batch], device), output_hidden_states=True).hidden_states[layer]
        out.append(h[:, 1:].to(torch.bfloat16))
    return torch.cat(out)


def lm_loss(model, feats, x, m, y, image_token_id):
    """Next-token loss on answer positions, the image placeholders filled with projected cached features
    (the same embeddings ``LlavaForConditionalGeneration`` builds, without re-running the frozen tower)."""
    emb = model.get_input_embeddings()(x)
    img = model.model.multi_modal_projector(feats.to(emb.dtype))
    emb = emb.masked_scatter((x == image_token_id)[..., None], img.to(emb.dtype))
    h = model.model.language_model(inputs_embeds=emb, attention_mask=m).last_hidden_state
    target = y[:, 1:]
    keep = target != -100
    logits = model.lm_head(h[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


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


def test_and_noise(model, processor, images_u8, bench, img_of, device) -> tuple[dict, dict]:
    """Accuracy on ``bench``'s questions with their images and with noise images instead, printed."""
    test_acc = accuracy(answer(model, processor, images_u8, bench.questions, img_of, device), bench.answers)
    noise = answer(model, processor, images_u8, bench.questions, img_of, device, noise=True)
    noise_acc = accuracy(noise, bench.answers)
    print("test", json.dumps({k: round(v, 3) for k, v in test_acc.items()}), flush=True)
    print("noise", json.dumps({k: round(v, 3) for k, v in noise_acc.items()}), flush=True)
    return test_acc, noise_acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", default=None, help="continue from this saved model (and its processor)")
    ap.add_argument("--train-scenes", type=int, default=50000)
    ap.add_argument("--val-scenes", type=int, default=300)
    ap.add_argument("--test-scenes", type=int, default=700)
    ap.add_argument("--questions-per-scene", type=int, default=8, help="turns of each training conversation")
    ap.add_argument("--steps", type=int, default=10**9, help="most language-model steps")
    ap.add_argument("--minutes", type=float, default=None, help="language-model stage length (schedule)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--vision-steps", type=int, default=2000)
    ap.add_argument("--vision-batch", type=int, default=256)
    ap.add_argument("--vision-lr", type=float, default=2e-3)
    ap.add_argument("--size", default="base")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.minutes is None and a.steps >= 10**9:
        ap.error("give --steps or --minutes")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    t0 = time.time()
    scenes, questions, answers, train_img = train_split(
        a.train_scenes, a.seed, a.questions_per_scene, a.workers
    )
    val, val_img, val_of = split_data("val", a.val_scenes, a.seed, 3, a.workers)
    test, test_img, test_of = split_data("test", a.test_scenes, a.seed, 3, a.workers)
    if a.init:
        processor = AutoProcessor.from_pretrained(a.init)
        model = LlavaForConditionalGeneration.from_pretrained(a.init, dtype=torch.float32)
    else:
        corpus = [
            SYSTEM + " USER: \n" + q["text"] + " ASSISTANT: " + r["answer"]
            for q, r in zip(questions, answers)
        ]
        processor = build_processor(build_tokenizer(corpus))
        model = LlavaForConditionalGeneration(build_config(processor.tokenizer, size=a.size))
    tokenizer, config = processor.tokenizer, model.config
    model.to(device).set_attn_implementation("sdpa")
    print(
        f"data ready in {time.time() - t0:.0f}s: {len(scenes)} scenes, {len(questions)} questions", flush=True
    )

    curve, val_curve = [], []
    t_vis = time.time()
    images = torch.from_numpy(train_img).to(device)
    if a.vision_steps:
        grid = config.vision_config.image_size // config.vision_config.patch_size
        vlabels = patch_labels(scenes, grid)
        pretrain_vision(model, images, vlabels, a.vision_steps, a.vision_batch, a.vision_lr, device, curve)
    model.model.vision_tower.requires_grad_(False)  # frozen from here on, as in LLaVA
    feats = vision_features(model, images, device)
    del images
    vision_seconds = time.time() - t_vis

    ids, labels = encode_conversations(tokenizer, scenes, questions, answers, rng, config.image_seq_length)
    all_x, all_m, all_y = padded(ids, labels, tokenizer.pad_token_id, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=a.lr,
        betas=(0.9, 0.98),
        fused=device == "cuda",
    )
    t_train = time.time()

    def progress(step):
        p = step / a.steps
        if a.minutes is not None:
            p = max(p, (time.time() - t_train) / (60 * a.minutes))
        return p

    step = 0
    while (p := progress(step)) < 1:
        model.train()
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * 0.5 * (1 + math.cos(math.pi * p))
        for gr in opt.param_groups:
            gr["lr"] = lr
        r = torch.from_numpy(rng.integers(0, len(ids), a.batch)).to(device)
        width = int(all_m[r].sum(1).max())
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = lm_loss(
                model, feats[r], all_x[r, :width], all_m[r, :width], all_y[r, :width], config.image_token_id
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0:
            curve.append(
                {"stage": "llm", "step": step, "loss": loss.item(), "lr": lr, "s": time.time() - t_train}
            )
            print(
                f"step {step} loss {loss.item():.4f} lr {lr:.2e} ({time.time() - t_train:.0f}s)", flush=True
            )
        step += 1
        if step % a.eval_every == 0:
            model.eval()
            acc = accuracy(answer(model, processor, val_img, val.questions, val_of, device), val.answers)
            val_curve.append({"step": step, "s": time.time() - t_train, **acc})
            print(f"val @ {step}: {json.dumps({k: round(v, 3) for k, v in acc.items()})}", flush=True)
    train_seconds = time.time() - t_train
    model.eval()
    test_acc, noise_acc = test_and_noise(model, processor, test_img, test, test_of, device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="15MB")
    processor.save_pretrained(out)
    report = {
        "command": "python -m mmsink.evals.train_reference "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "init": a.init,
        "steps_done": step,
        "train_scenes": len(scenes),
        "train_questions": len(questions),
        "vision_pretrain_steps": a.vision_steps,
        "vision_seconds": vision_seconds,
        "train_seconds": train_seconds,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "loss_curve": curve,
        "val_curve": val_curve,
        "test_accuracy": test_acc,
        "noise_image_accuracy": noise_acc,
        "test_questions": len(test.questions),
    }
    if a.init and (Path(a.init) / "training.json").exists():
        report["previous"] = json.loads((Path(a.init) / "training.json").read_text())
    (out / "training.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
