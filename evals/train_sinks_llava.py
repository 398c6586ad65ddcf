"""The multimodal stage of ``models/synthllava-sinks`` (issue 16): a CLIP-style tower, then LLaVA-1.5's two
stages on the pre-trained language model (``evals/train_sinks.py``). Two calls, one per stage:

    python -m evals.train_sinks_llava tower --out OUT/tower --time-budget 500
    python -m evals.train_sinks_llava llava --tower OUT/tower --lm .lm_g \\
        --tokenizer .corpus2/tokenizer.json --out OUT/model --time-budget 500

``tower``: a small ``CLIPVisionModel`` pre-trained as CLIP is: symmetric image-caption InfoNCE over the
batch with a learnable temperature, a text transformer of its own (``CLIPTextModel``, causal, pooled at
the caption's ``</s>``; kept beside the tower only so that a run can continue, never part of the LVLM),
AdamW with weight decay on matrices, warmup and cosine decay, bf16 autocast. Captions come from the scene
structure of the synthvqa train split (every object with colour, shape, size and place, counts, digits,
background) in varied wording. The objective is global (one embedding per image); nothing looks at
norms, attention or activations. Measured on validation scenes: retrieval top-1 both ways, and per image
the largest patch-token norm over the median (Darcet et al.'s high-norm tokens) at the feature layer the
projector reads and at the last layer, with how often the largest lies on background. ``--mask-ratio``
adds FLIP's patch masking (``PatchDrop``; training only, the last ``--unmasked-frac`` of the schedule
unmasked); probes and the saved tower are unmasked.

``llava``: the tower (frozen) + the language model + a fresh two-layer GELU projector as a
``LlavaForConditionalGeneration``, the corpus BPE tokenizer with LLaVA-1.5's chat template. Stage 1
(alignment): only the projector trains, on "describe the image" turns answered with a caption, the LM
frozen. Stage 2 (instruction tuning): projector and the whole LM on the multi-turn synthvqa
conversations of ``evals/train_reference.py``. Weight decay 0 and warmup 3 % of each stage as in
LLaVA-1.5. Plain corpus text is not mixed in (the corpus cannot travel with the checkpoint).

Each stage's schedule follows elapsed time when ``--time-budget`` is given (the step counts then depend
on the machine); ``--init`` continues a saved tower or model with a fresh optimizer and warmup, the
earlier records kept under ``previous``. Everything is seeded. Outputs are bf16 safetensors in shards
under 16 MB with ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .reference_model import IMAGE_TOKEN, build_processor, fast_tokenizer, prompt_text
from .synthvqa import PLURALS, make_scene, render_scene
from .train_reference import (
    accuracy,
    answer,
    encode_conversations,
    lm_loss,
    padded,
    patch_labels,
    pixels,
    split_data,
    test_and_noise,
    train_split,
    vision_features,
)

EOS, PAD = 2, 3
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ALIGN_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of the picture.",
    "What is in this image?",
    "Summarize what you see.",
    "Describe the scene.",
    "Write a caption for the image.",
)


# ----------------------------------------------------------------------------- captions


def place(bbox, size: int, rng) -> str:
    """The object's cell of a 3 x 3 grid over the image, in one of a few wordings."""
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    col, row = min(2, int(3 * cx / size)), min(2, int(3 * cy / size))
    vert = (("top", "upper"), ("middle",), ("bottom", "lower"))[row]
    horiz = (("left",), ("center", "middle"), ("right",))[col]
    if row == 1 and col == 1:
        return str(rng.choice(["center", "middle", "centre"]))
    if row == 1:
        return str(rng.choice([f"{horiz[0]} side", f"middle {horiz[0]}", f"{horiz[0]} edge"]))
    v = str(rng.choice(vert))
    if col == 1:
        return str(rng.choice([f"{v} center", f"{v} middle", ("top", "bottom")[row // 2]]))
    return str(rng.choice([f"{v} {horiz[0]}", f"{v} {horiz[0]} corner", f"{v}-{horiz[0]}"]))


def count_word(n: int, rng) -> str:
    return str(n) if rng.random() < 0.5 else NUMBER_WORDS[n]


def caption(scene, rng) -> str:
    """A description of the whole scene in randomly chosen wording: every object (colour and shape, often
    its size, always its place), the digits, the background and some counts."""
    size = scene.size
    objs = list(scene.objects)
    order = rng.permutation(len(objs))
    sort_x = rng.random() < 0.25
    if sort_x:
        order = sorted(range(len(objs)), key=lambda i: objs[i].center[0])
    with_size = rng.random() < 0.5
    prep = str(rng.choice(["in the", "at the", "on the"]))
    paren = rng.random() < 0.2
    parts = []
    for i in order:
        o = objs[i]
        name = f"{o.size} {o.color} {o.shape}" if with_size else f"{o.color} {o.shape}"
        where = place(o.bbox, size, rng)
        if paren:
            parts.append(f"{name} ({where})")
        else:
            art = "an" if name[0] in "aeiou" else "a"
            parts.append(f"{art} {name} {prep} {where}")
    listing = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    n = len(objs)
    noun = str(rng.choice(["shapes", "objects", "geometric shapes"]))
    opening = [
        f"There are {count_word(n, rng)} {noun}: {listing}.",
        f"The image shows {listing}.",
        f"{count_word(n, rng).capitalize()} {noun}: {listing}.",
        f"A picture of {listing}.",
    ]
    if sort_x:
        opening = [
            f"From left to right: {listing}.",
            f"{count_word(n, rng).capitalize()} {noun}, left to right: {listing}.",
        ]
    sentences = [str(rng.choice(opening))]
    if rng.random() < 0.35:
        counts = {}
        for o in objs:
            counts[o.shape] = counts.get(o.shape, 0) + 1
        bits = [f"{count_word(c, rng)} {PLURALS[s] if c > 1 else s}" for s, c in counts.items()]
        sentences.append("In total " + ", ".join(bits) + ".")
    bg = scene.background
    bg_word = str(rng.choice(["background", "backdrop"]))
    art = "a " if bg.kind == "gradient" else ""
    bg_text = [f"The {bg_word} is {art}{bg.name}.", f"It is set on a {bg.name} {bg_word}."]
    if bg.kind == "gradient" and rng.random() < 0.5:
        bg_text = [f"The {bg_word} is a {bg.direction} {bg.name}."]
    digits = []
    for d in scene.digits:
        tone = ""
        if rng.random() < 0.3:
            tone = " dark on light" if d.dark_on_light else " light on dark"
        digits.append(f"a handwritten {d.value}{tone} {prep} {place(d.bbox, size, rng)}")
    if digits:
        head = "There is " if len(digits) == 1 else f"There are {count_word(len(digits), rng)} digits: "
        digit_text = head + " and ".join(digits) + "."
    else:
        digit_text = str(rng.choice(["There are no handwritten digits.", "No digits.", ""]))
    tail = [str(rng.choice(bg_text)), digit_text]
    if rng.random() < 0.5:
        tail.reverse()
    if scene.noise_std >= 6 and rng.random() < 0.5:
        tail.append(str(rng.choice(["The image is grainy.", "There is some noise."])))
    return " ".join(s for s in sentences + tail if s)


def encode_captions(tok, texts, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, max_len] ids (``</s>`` after each caption, ``<pad>`` after that) and the caption lengths."""
    enc = tok.encode_batch([t for t in texts], add_special_tokens=False)
    ids = torch.full((len(texts), max_len), PAD, dtype=torch.long)
    lens = torch.empty(len(texts), dtype=torch.long)
    for i, e in enumerate(enc):
        x = e.ids[: max_len - 1] + [EOS]
        ids[i, : len(x)] = torch.tensor(x)
        lens[i] = len(x)
    return ids, lens


# ----------------------------------------------------------------------------- CLIP-style tower


class Clip(torch.nn.Module):
    """Vision tower, text encoder, their projections and the learnable temperature (CLIP's layout)."""

    def __init__(self, vision, text, embed: int):
        super().__init__()
        self.vision, self.text = vision, text
        self.proj_v = torch.nn.Linear(vision.config.hidden_size, embed, bias=False)
        self.proj_t = torch.nn.Linear(text.config.hidden_size, embed, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embeds(self, pix):
        return torch.nn.functional.normalize(self.proj_v(self.vision(pixel_values=pix).pooler_output), dim=-1)

    def text_embeds(self, ids, lens):
        h = self.text(input_ids=ids).last_hidden_state  # causal: the </s> position has read the caption
        return torch.nn.functional.normalize(self.proj_t(h[torch.arange(len(ids)), lens - 1]), dim=-1)

    def forward(self, pix, ids, lens):
        img, txt = self.image_embeds(pix), self.text_embeds(ids, lens)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * img.float() @ txt.float().T
        target = torch.arange(len(img), device=img.device)
        ce = torch.nn.functional.cross_entropy
        return (ce(logits, target) + ce(logits.T, target)) / 2


class PatchDrop:
    """FLIP's patch masking (Li et al., CVPR 2023) as a forward hook on a ``CLIPVisionModel``'s embeddings:
    while the tower is in training mode and ``active``, each image keeps the class token and a uniformly
    random subset of ``keep`` of its patch tokens (position embeddings already added), so the encoder only
    sees those. In eval mode, or inactive, the hook returns nothing and the forward is the plain one; the
    module and its saved weights stay a plain ``CLIPVisionModel``. ``last``: the kept positions of the
    latest masked call ([B, 1 + keep], class token at 0, ascending)."""

    def __init__(self, vision, ratio: float):
        self.patches = (vision.config.image_size // vision.config.patch_size) ** 2
        self.keep = round((1 - ratio) * self.patches)
        if not 0 <= ratio < 1 or self.keep < 1:
            raise ValueError(f"mask ratio {ratio} must be in [0, 1) and keep a patch of {self.patches}")
        self.active = ratio > 0
        self.last = None
        self.handle = vision.embeddings.register_forward_hook(self._hook)

    def positions(self, batch: int, device) -> torch.Tensor:
        # argsort of uniform noise: a uniformly random subset per image (MAE / FLIP's way); +1 skips the CLS
        pick = torch.rand(batch, self.patches, device=device).argsort(1)[:, : self.keep].sort(1).values + 1
        return torch.cat([torch.zeros(batch, 1, dtype=pick.dtype, device=device), pick], 1)

    def _hook(self, module, args, out):
        if not (self.active and module.training):
            return None
        idx = self.positions(out.shape[0], out.device)
        self.last = idx
        return out.gather(1, idx[..., None].expand(-1, -1, out.shape[-1]))


def build_clip(a, vocab: int) -> Clip:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    if a.init:
        vision = CLIPVisionModel.from_pretrained(Path(a.init) / "vision", dtype=torch.float32)
        text = CLIPTextModel.from_pretrained(Path(a.init) / "text", dtype=torch.float32)
        clip = Clip(vision, text, a.embed)
        from safetensors.torch import load_file

        clip.load_state_dict(load_file(Path(a.init) / "heads.safetensors"), strict=False)
        return clip
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=a.v_hidden,
            intermediate_size=a.v_mlp,
            num_hidden_layers=a.v_layers,
            num_attention_heads=a.v_heads,
            image_size=a.image_size,
            patch_size=a.patch_size,
            projection_dim=a.embed,
        )
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=a.t_hidden,
            intermediate_size=4 * a.t_hidden,
            num_hidden_layers=a.t_layers,
            num_attention_heads=a.t_heads,
            max_position_embeddings=a.caption_len,
            projection_dim=a.embed,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=EOS,
        )
    )
    return Clip(vision, text, a.embed)


def save_clip(clip: Clip, out: Path, record: dict, shard: str) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name in ("vision", "text"):
        part = getattr(clip, name)
        sd = {k: v.detach().to(torch.bfloat16).cpu() for k, v in part.state_dict().items()}
        part.save_pretrained(out / name, state_dict=sd, max_shard_size=shard)
    heads = {k: v.detach().float().cpu().contiguous() for k, v in clip.state_dict().items() if "." not in k}
    heads |= {k: v.detach().float().cpu() for k, v in clip.state_dict().items() if k.startswith("proj_")}
    save_file(heads, out / "heads.safetensors")
    (out / "training.json").write_text(json.dumps(record, indent=1))


def scene_images(seed: int, split_code: int, lo: int, hi: int, prefix: str, size: int = 224, n_caps: int = 1):
    """Scenes lo..hi of a split's streams (``make_scenes``'s keys), their uint8 pixels and ``n_caps``
    captions of each (drawn from a stream of the scene's own, so independent of the chunking)."""
    from .synthvqa import digit_pool

    pool = digit_pool(prefix)
    scenes = [
        make_scene(np.random.default_rng([seed, split_code, i]), f"{prefix}_{i:05d}", size, pool=pool)
        for i in range(lo, hi)
    ]
    caps = []
    for i, s in zip(range(lo, hi), scenes):
        rng = np.random.default_rng([seed, split_code, i, 7])
        caps += [caption(s, rng) for _ in range(n_caps)]
    return scenes, np.stack([np.asarray(render_scene(s), dtype=np.uint8) for s in scenes]), caps


def _scene_chunk(job):
    return scene_images(*job)


def render_split(
    n: int, seed: int, split: str, workers: int, size: int = 224, n_caps: int = 1, chunk: int = 1000
):
    code = {"train": 0, "val": 1, "test": 2}[split]
    jobs = [(seed, code, lo, min(lo + chunk, n), split, size, n_caps) for lo in range(0, n, chunk)]
    if workers > 1:
        from multiprocessing import Pool

        with Pool(workers) as p:
            parts = p.map(_scene_chunk, jobs)
    else:
        parts = [_scene_chunk(j) for j in jobs]
    return (
        [s for p in parts for s in p[0]],
        np.concatenate([p[1] for p in parts]),
        [c for p in parts for c in p[2]],
    )


@torch.no_grad()
def tower_probe(clip: Clip, images, val_scenes, ids, lens, layer: int, autocast, batch: int = 256) -> dict:
    """Retrieval top-1 both ways over all validation pairs, and the patch-token norm statistics."""
    was = clip.training
    clip.eval()
    dev = ids.device
    img, txt, ratios = [], [], {"feature": [], "last": []}
    bg_hits = {"feature": [], "last": []}
    grid = clip.vision.config.image_size // clip.vision.config.patch_size
    col, shp, dig, _, _ = patch_labels(val_scenes, grid, clip.vision.config.image_size)
    background = ((col == 0) & (shp == 0) & (dig == 0)).to(dev)
    for s in range(0, len(images), batch):
        pix = pixels(images[s : s + batch], dev)
        with autocast():
            out = clip.vision(pixel_values=pix, output_hidden_states=True)
            img.append(torch.nn.functional.normalize(clip.proj_v(out.pooler_output), dim=-1).float())
            txt.append(clip.text_embeds(ids[s : s + batch], lens[s : s + batch]).float())
        for key, h in (("feature", out.hidden_states[layer]), ("last", out.hidden_states[-1])):
            n = h[:, 1:].float().norm(dim=-1)  # patch tokens only, as the projector reads them
            ratios[key].append(n.max(1).values / n.median(1).values)
            bg_hits[key].append(background[s : s + batch].gather(1, n.argmax(1, keepdim=True))[:, 0])
    img, txt = torch.cat(img), torch.cat(txt)
    sim = img @ txt.T
    target = torch.arange(len(img), device=dev)
    res = {
        "i2t_top1": round(float((sim.argmax(1) == target).float().mean()), 4),
        "t2i_top1": round(float((sim.argmax(0) == target).float().mean()), 4),
        "logit_scale": round(float(clip.logit_scale.exp()), 3),
    }
    for key in ratios:
        r, b = torch.cat(ratios[key]), torch.cat(bg_hits[key]).float()
        res[f"norm_{key}"] = {
            "images_over_3x": round(float((r > 3).float().mean()), 4),
            "ratio_median": round(float(r.median()), 3),
            "ratio_max": round(float(r.max()), 3),
            "argmax_on_background": round(float(b.mean()), 4),
        }
    clip.train(was)
    return res


def backward_step(fn, params, enabled: bool):
    """``step(*args)``: the loss of ``fn(*args)``, already backpropagated, through torch.compile when
    ``enabled``; if compiling fails in the first step (forward or backward), that step and the rest run
    eagerly."""
    compiled = torch.compile(fn) if enabled else None
    state = {"ok": None if enabled else False}

    def step(*args):
        if state["ok"] is False:
            loss = fn(*args)
            loss.backward()
            return loss
        try:
            loss = compiled(*args)
            loss.backward()
        except Exception as e:  # noqa: BLE001 - any compiler failure in the first step: train eagerly
            if state["ok"]:
                raise
            print(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); eager", flush=True)
            state["ok"] = False
            for p in params:
                p.grad = None
            return step(*args)
        state["ok"] = True
        return loss

    return step


def cosine(p: float, warm: float, peak: float, floor: float = 0.0) -> float:
    if p < warm:
        return peak * p / warm
    q = min(1.0, (p - warm) / max(1e-9, 1 - warm))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * q)))


def train_tower(a, argv) -> dict:
    from tokenizers import Tokenizer

    t0 = time.time()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(a.seed)
    tok = Tokenizer.from_file(a.tokenizer)
    scenes, images, caps = render_split(
        a.scenes, a.seed, "train", a.workers, a.image_size, a.captions_per_scene
    )
    ids, lens = encode_captions(tok, caps, a.caption_len)
    ids = ids.view(len(scenes), a.captions_per_scene, -1).to(dev)
    lens = lens.view(len(scenes), -1).to(dev)
    val_scenes, val_images, vcaps = render_split(a.val_scenes, a.seed, "val", a.workers, a.image_size)
    vids, vlens = encode_captions(tok, vcaps, a.caption_len)
    vids, vlens, val_images = vids.to(dev), vlens.to(dev), torch.from_numpy(val_images).to(dev)
    images = torch.from_numpy(images).to(dev)
    print(
        f"tower data in {time.time() - t0:.0f}s: {len(scenes)} scenes x {a.captions_per_scene} captions, "
        f"caption tokens max {int(lens.max())} mean {float(lens.float().mean()):.1f}",
        flush=True,
    )
    clip = build_clip(a, tok.get_vocab_size()).to(dev).train()
    drop = PatchDrop(clip.vision, a.mask_ratio)  # training only: probes run the tower in eval mode, unmasked
    # CLIP's split: weight decay on every matrix, none on gains, biases, the class token or the temperature
    decay = [p for p in clip.parameters() if p.dim() >= 2]
    keep = [p for p in clip.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.wd}, {"params": keep, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=cuda,
    )

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def step_loss(pix, x, n):
        with autocast():
            return clip(pix, x, n)

    step_fn = backward_step(step_loss, list(clip.parameters()), a.compile)
    previous = []
    if a.init and (Path(a.init) / "training.json").exists():
        p = json.loads((Path(a.init) / "training.json").read_text())
        previous = p.get("previous", []) + [{k: v for k, v in p.items() if k != "previous"}]
    record = {
        "stage": "tower",
        "command": "python -m evals.train_sinks_llava " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(a),
        "params": {
            "vision": sum(p.numel() for p in clip.vision.parameters()),
            "text": sum(p.numel() for p in clip.text.parameters()),
        },
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "data_s": round(time.time() - t0, 1),
        "patches_kept": drop.keep if drop.active else drop.patches,
        "unmasked_from_step": None if drop.active else 0,
        "curve": [],
        "probes": [],
        "previous": previous,
    }
    layer = a.feature_layer

    def probe(step):
        t = time.time()
        m = tower_probe(clip, val_images, val_scenes, vids, vlens, layer, autocast)
        m.update(step=step, s=round(time.time() - t0, 1), probe_s=round(time.time() - t, 1))
        record["probes"].append(m)
        print(json.dumps(m), flush=True)

    probe(0)
    t_train = time.time()
    train_s = max(1.0, a.time_budget - (t_train - t0) - a.reserve) if a.time_budget else None
    step, losses, perm, pos = 0, [], torch.randperm(len(scenes), device=dev), 0
    while True:
        p = step / a.steps
        if train_s:
            p = max(p, (time.time() - t_train) / train_s)
        if p >= 1:
            break
        lr = cosine(p, a.warmup, a.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        if drop.active and p >= 1 - a.unmasked_frac:  # FLIP's unmasked tuning: the schedule's last share
            drop.active = False
            record["unmasked_from_step"] = step
            print(f"unmasked from step {step}", flush=True)
        if pos + a.batch > len(perm):  # epochs of a permutation: no scene twice in one batch
            perm, pos = torch.randperm(len(scenes), device=dev), 0
        r = perm[pos : pos + a.batch]
        pos += a.batch
        k = torch.randint(0, a.captions_per_scene, (len(r),), device=dev)
        opt.zero_grad(set_to_none=True)
        loss = step_fn(pixels(images[r], dev), ids[r, k], lens[r, k])
        gn = torch.nn.utils.clip_grad_norm_(clip.parameters(), a.clip)
        opt.step()
        losses.append(loss.detach())
        step += 1
        if step % a.log_every == 0:
            lv = float(torch.stack(losses).mean())
            losses = []
            record["curve"].append(
                {
                    "step": step,
                    "loss": round(lv, 4),
                    "lr": lr,
                    "grad_norm": round(float(gn), 3),
                    "temp": round(float(clip.logit_scale.detach().exp()), 3),
                    "s": round(time.time() - t0, 1),
                }
            )
            print(json.dumps(record["curve"][-1]), flush=True)
            if not math.isfinite(lv):
                print("loss is not finite; stopping", flush=True)
                break
        if step % a.eval_every == 0:
            probe(step)
    record["steps_done"] = step
    record["train_s"] = round(time.time() - t_train, 1)
    if not record["probes"] or record["probes"][-1]["step"] != step:
        probe(step)
    record["wall_s"] = round(time.time() - t0, 1)
    save_clip(clip, Path(a.out), record, a.shard)
    return record


# ----------------------------------------------------------------------------- LLaVA


def build_llava(tower: Path, lm: Path, tokenizer_file: Path):
    """(model, processor): the tower's vision weights, the pre-trained LM's weights, a fresh projector."""
    from tokenizers import Tokenizer
    from transformers import (
        CLIPVisionModel,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionModel.from_pretrained(Path(tower) / "vision", dtype=torch.float32)
    text_cfg = LlamaConfig.from_pretrained(lm)
    tok = fast_tokenizer(Tokenizer.from_file(str(tokenizer_file)), text_cfg.max_position_embeddings)
    if len(tok) != text_cfg.vocab_size or tok.convert_tokens_to_ids(IMAGE_TOKEN) is None:
        raise SystemExit(f"tokenizer {tokenizer_file} ({len(tok)} tokens) does not match {lm}")
    vc = vision.config
    processor = build_processor(tok, vc.image_size, vc.patch_size)
    cfg = LlavaConfig(
        vision_config=vc.to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vc.image_size // vc.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=text_cfg.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(cfg).float()  # fp32 master weights (the LM's config says bf16)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    causal = LlamaForCausalLM.from_pretrained(lm, dtype=torch.float32)
    model.model.language_model.load_state_dict(causal.model.state_dict())
    model.lm_head.load_state_dict(causal.lm_head.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model, processor


def encode_captions_turns(tok, scenes, rng, n_image_tokens):
    """Stage-1 sequences: a describe-the-image prompt then a caption and ``</s>`` (the labels)."""
    prompts = [prompt_text(str(rng.choice(ALIGN_PROMPTS))) for _ in scenes]
    heads = tok([p.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens) for p in prompts])["input_ids"]
    caps = tok([" " + caption(s, rng) for s in scenes], add_special_tokens=False)["input_ids"]
    ids = [h + c + [tok.eos_token_id] for h, c in zip(heads, caps)]
    labels = [[-100] * len(h) + c + [tok.eos_token_id] for h, c in zip(heads, caps)]
    return ids, labels


def run_stage(name, model, params, feats, data, a, seconds, steps, lr, cfg, log, evaluate=None):
    """One LLaVA stage: AdamW (no weight decay), warmup then cosine to 0, over ``seconds`` or ``steps``.

    ``params``: tensors, or ``{"params": [...], "scale": s}`` groups whose lr is ``s`` x the schedule's.
    """
    x_all, m_all, y_all = data
    cuda = x_all.device.type == "cuda"
    groups = params if params and isinstance(params[0], dict) else [{"params": params, "scale": 1.0}]
    groups = [g for g in groups if g["scale"] > 0]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=cuda)
    gen = torch.Generator(device="cpu").manual_seed(a.seed + (1 if name == "align" else 2))
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext

    def step_loss(f, x, m, y):
        with ctx():
            return lm_loss(model, f, x, m, y, cfg.image_token_id)

    fn = backward_step(step_loss, params, a.compile)
    t0, step, losses = time.time(), 0, []
    while True:
        p = step / steps if steps else 0.0
        if seconds:
            p = max(p, (time.time() - t0) / seconds)
        if p >= 1 or (not seconds and not steps):
            break
        cur = cosine(p, a.warmup, lr)
        for g in opt.param_groups:
            g["lr"] = cur * g["scale"]
        model.train()
        r = torch.randint(0, len(x_all), (a.batch,), generator=gen).to(x_all.device)
        # one padded width for every batch under torch.compile (no recompiles); the batch's own otherwise
        w = x_all.shape[1] if a.compile else int(m_all[r].sum(1).max())
        opt.zero_grad(set_to_none=True)
        loss = fn(feats[r], x_all[r, :w], m_all[r, :w], y_all[r, :w])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.detach())
        step += 1
        if step % a.log_every == 0:
            lv = float(torch.stack(losses).mean())
            losses = []
            log.append(
                {
                    "stage": name,
                    "step": step,
                    "loss": round(lv, 4),
                    "lr": cur,
                    "s": round(time.time() - t0, 1),
                }
            )
            print(json.dumps(log[-1]), flush=True)
            if not math.isfinite(lv):
                raise SystemExit(f"{name}: loss is not finite at step {step}")
        if evaluate is not None and step % a.eval_every == 0:
            evaluate(step)
    return step, time.time() - t0


def train_llava(a, argv) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    t0 = time.time()
    dev = a.device
    cuda = dev.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    scenes, questions, answers, train_img = train_split(
        a.train_scenes, a.seed, a.questions_per_scene, a.workers
    )
    val, val_img, val_of = (
        split_data("val", a.val_scenes, a.seed, 3, a.workers) if a.val_scenes else [None] * 3
    )
    test, test_img, test_of = (
        split_data("test", a.test_scenes, a.seed, 3, a.workers) if a.test_scenes else [None] * 3
    )
    previous = []
    if a.init:
        processor = AutoProcessor.from_pretrained(a.init)
        model = LlavaForConditionalGeneration.from_pretrained(a.init, dtype=torch.float32)
        prev = Path(a.init) / "training.json"
        if prev.exists():
            p = json.loads(prev.read_text())
            previous = p.get("previous", []) + [{k: v for k, v in p.items() if k != "previous"}]
    else:
        if not (a.tower and a.lm and a.tokenizer):
            raise SystemExit("llava: give --tower, --lm and --tokenizer (or --init a saved model)")
        model, processor = build_llava(Path(a.tower), Path(a.lm), Path(a.tokenizer))
    tok, cfg = processor.tokenizer, model.config
    model.to(dev).set_attn_implementation("sdpa")
    model.model.vision_tower.requires_grad_(False)  # frozen in both stages, as in LLaVA-1.5
    images = torch.from_numpy(train_img).to(dev)
    feats = vision_features(model, images, dev)
    del images
    n_img = cfg.image_seq_length
    conv = padded(*encode_conversations(tok, scenes, questions, answers, rng, n_img), tok.pad_token_id, dev)
    print(
        f"data and features in {time.time() - t0:.0f}s: {len(scenes)} scenes, {len(questions)} questions, "
        f"conversation length <= {conv[0].shape[1]}",
        flush=True,
    )

    curve, val_curve = [], []

    def evaluate(step):
        model.eval()
        acc = accuracy(answer(model, processor, val_img, val.questions, val_of, dev), val.answers)
        val_curve.append({"step": step, **{k: round(v, 4) for k, v in acc.items()}})
        print("val", json.dumps(val_curve[-1]), flush=True)

    left = a.time_budget - (time.time() - t0) - a.reserve if a.time_budget else 0.0
    if a.time_budget and left <= 0:
        raise SystemExit(f"no time left to train after {time.time() - t0:.0f}s of data preparation")
    align_steps = align_s = 0
    if not a.init and (a.align_frac > 0 or a.align_steps):
        lm_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
        for p in lm_params:
            p.requires_grad_(False)
        cap = padded(*encode_captions_turns(tok, scenes, rng, n_img), tok.pad_token_id, dev)
        proj = list(model.model.multi_modal_projector.parameters())
        align_steps, align_s = run_stage(
            "align", model, proj, feats, cap, a, left * a.align_frac, a.align_steps, a.align_lr, cfg, curve
        )
        del cap
        for p in lm_params:
            p.requires_grad_(True)
    left2 = left - align_s if a.time_budget else 0.0
    lm_ids = {id(p) for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]}
    trained = [p for p in model.parameters() if p.requires_grad]
    params = [
        {"params": [p for p in trained if id(p) not in lm_ids], "scale": 1.0},
        {"params": [p for p in trained if id(p) in lm_ids], "scale": a.lm_lr_scale},
    ]
    if a.lm_lr_scale == 0:  # a frozen LM: no gradients through its weights at all
        for p in params[1]["params"]:
            p.requires_grad_(False)
    steps, instruct_s = run_stage(
        "instruct", model, params, feats, conv, a, left2, a.steps, a.lr, cfg, curve, evaluate if val else None
    )
    model.eval()
    test_acc = noise_acc = None
    if test is not None:
        test_acc, noise_acc = test_and_noise(model, processor, test_img, test, test_of, dev)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size=a.shard)
    processor.save_pretrained(out)
    sources = {}
    for key, path in (("tower", a.tower), ("lm", a.lm)):
        f = Path(path) / "training.json" if path else None
        if f and f.exists():
            r = json.loads(f.read_text())
            sources[key] = {
                "path": str(path),
                "command": r.get("command"),
                "probes": r.get("probes", [])[-1:],
            }
    record = {
        "stage": "llava",
        "command": "python -m evals.train_sinks_llava " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(a),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes_on_disk": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "sources": sources,
        "train_scenes": len(scenes),
        "train_questions": len(questions),
        "align_steps": align_steps,
        "instruct_steps": steps,
        "align_s": round(align_s, 1),
        "instruct_s": round(instruct_s, 1),
        "wall_s": round(time.time() - t0, 1),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "loss_curve": curve,
        "val_curve": val_curve,
        "test_accuracy": test_acc,
        "noise_image_accuracy": noise_acc,
        "test_questions": len(test.questions) if test is not None else 0,
        "previous": previous,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------- CLI


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True)
    common.add_argument("--init", default=None, help="continue from a saved tower / model (fresh optimizer)")
    common.add_argument("--time-budget", type=float, default=0.0, help="seconds for the whole call")
    common.add_argument(
        "--reserve", type=float, default=60.0, help="seconds kept for final evaluation + save"
    )
    # per-stage defaults resolved after parsing: set_defaults on a subparser writes the parent's shared
    # action, so the last stage's values became both stages' (tower run 1 trained at 256 / 3e-4 so)
    common.add_argument("--batch", type=int, help="default: tower 1024, llava 256")
    common.add_argument("--lr", type=float, help="default: tower 1e-3, llava 3e-4")
    common.add_argument("--warmup", type=float, default=0.03, help="share of the schedule")
    common.add_argument(
        "--steps", type=int, default=10**9, help="most steps (the schedule's length without --time-budget)"
    )
    common.add_argument("--log-every", type=int, default=50)
    common.add_argument("--eval-every", type=int, default=500)
    common.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--shard", default="15MB")
    common.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t = sub.add_parser("tower", parents=[common], help="CLIP-style contrastive pre-training of the tower")
    t.add_argument("--tokenizer", default=".corpus2/tokenizer.json", help="BPE for the captions")
    t.add_argument("--scenes", type=int, default=100000, help="train-split scenes rendered once")
    t.add_argument("--captions-per-scene", type=int, default=4)
    t.add_argument("--caption-len", type=int, default=160)
    t.add_argument("--val-scenes", type=int, default=1000)
    t.add_argument("--wd", type=float, default=0.2, help="CLIP's weight decay")
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--image-size", type=int, default=224, help="224: the benchmark's (smaller: CPU pilots)")
    t.add_argument("--patch-size", type=int, default=14)
    t.add_argument("--v-hidden", type=int, default=192)
    t.add_argument("--v-layers", type=int, default=6)
    t.add_argument("--v-heads", type=int, default=6)
    t.add_argument("--v-mlp", type=int, default=576)
    t.add_argument("--t-hidden", type=int, default=256)
    t.add_argument("--t-layers", type=int, default=4)
    t.add_argument("--t-heads", type=int, default=4)
    t.add_argument("--embed", type=int, default=256, help="joint embedding width")
    t.add_argument("--feature-layer", type=int, default=-2, help="hidden state the LLaVA projector will read")
    t.add_argument(
        "--mask-ratio", type=float, default=0.0, help="FLIP: share of patch tokens dropped per training image"
    )
    t.add_argument(
        "--unmasked-frac", type=float, default=0.0, help="FLIP: last share of the schedule trained unmasked"
    )
    m = sub.add_parser("llava", parents=[common], help="projector alignment, then instruction tuning")
    m.add_argument("--tower", default=None, help="folder written by the tower stage")
    m.add_argument("--lm", default=None, help="pre-trained LlamaForCausalLM folder (train_sinks.py)")
    m.add_argument("--tokenizer", default=None, help="the LM's corpus tokenizer.json")
    m.add_argument("--train-scenes", type=int, default=50000)
    m.add_argument("--val-scenes", type=int, default=300)
    m.add_argument("--test-scenes", type=int, default=700)
    m.add_argument("--questions-per-scene", type=int, default=8)
    m.add_argument("--align-frac", type=float, default=0.15, help="share of the training time for stage 1")
    m.add_argument("--align-steps", type=int, default=0, help="most stage-1 steps (without --time-budget)")
    m.add_argument("--align-lr", type=float, default=1e-3)
    m.add_argument(
        "--lm-lr-scale",
        type=float,
        default=1.0,
        help="instruction tuning: the LM's lr as a share of --lr (0: LM frozen, projector only)",
    )
    a = ap.parse_args(argv)
    batch, lr = {"tower": (1024, 1e-3), "llava": (256, 3e-4)}[a.stage]
    a.batch = batch if a.batch is None else a.batch
    a.lr = lr if a.lr is None else a.lr
    if not a.time_budget and a.steps >= 10**9:
        ap.error("give --steps or --time-budget")
    if a.stage == "llava" and not 0 <= a.lm_lr_scale <= 1:
        ap.error(f"--lm-lr-scale must be in [0, 1], got {a.lm_lr_scale}")
    if a.stage == "tower":
        if not 0 <= a.unmasked_frac <= 1:
            ap.error(f"--unmasked-frac must be in [0, 1], got {a.unmasked_frac}")
        n = (a.image_size // a.patch_size) ** 2
        if not 0 <= a.mask_ratio < 1 or round((1 - a.mask_ratio) * n) < 1:
            ap.error(f"--mask-ratio must be in [0, 1) and keep at least one of the {n} patches")
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    return train_tower(a, argv) if a.stage == "tower" else train_llava(a, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
