"""Issue 16's "done means" for a reference model, measured with mmsink's own tools, in one table.

    python -m evals.sink_criteria --model models/synthllava --images 200 \
        --out evals/results/reference_sinks/criteria_synthllava

On the first ``--images`` test images of the bundled benchmark (synthvqa, the split ``mmsink eval`` uses;
every question of those images for accuracy, the first question of each image for the diagnostics):

1. accuracy (``mmsink eval``'s run_eval), and on uniform-noise images against the blind-guess rate (each
   category's most common answer, as tests/test_reference_model.py);
2. first-token sink: mean over heads and instruction rows (text after the image) of the attention to
   token 0, per LLM layer, from ``mmsink inspect``'s collect();
3. massive activations: the sink channels ``mmsink calibrate`` finds, then VAR's detector
   (``sinks/var.py`` key_codes at tau) on the hidden state entering each layer: the share of images
   with a visual sink token; and VAR's phi over all channels (max |h_d| / RMS(h)), so a near miss shows;
4. ViT high-norm tokens: ViT-sink forwarding's adaptive rule (``sinks/vitsink.py`` detect: norm > 3x the
   image's median) on the tower layer LLaVA reads (vision_feature_layer) and on the last tower layer;
5. redundancy: accuracy with the seeded random pruner at 33 % of the visual tokens over full accuracy.

Writes <out>.json and <out>.md; answers files and noise images go to --work (a rerun resumes them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from mmsink.sinks.var import VISUAL_SINK, VARConfig, key_codes, sink_scores
from mmsink.sinks.vitsink import SinkForwardConfig, detect
from mmsink.tools import diagnose
from mmsink.tools.diagnose import layer_report

from . import vqa

# thresholds of issue 16's "done means"
ACCURACY, NOISE_MARGIN, FIRST_TOKEN, SINK_SHARE, VIT_SHARE, KEEP = 0.90, 0.05, 0.3, 0.5, 0.5, 0.85


# ----------------------------------------------------------------------------- one image


def tower_of(model):
    tower = getattr(getattr(model, "model", model), "vision_tower", None)
    if tower is None:
        raise ValueError(f"mmsink sink_criteria: {type(model).__name__} has no vision_tower (LLaVA only)")
    return tower


def vit_facts(norms: torch.Tensor, factor: float) -> dict:
    """ViT-sink forwarding's adaptive detection on one image's token norms [tokens]."""
    cfg = SinkForwardConfig(factor=factor, max_sinks=norms.numel())
    found = detect(norms, cfg, None)  # None: the adaptive rule (x factor of the median), not a known tower's
    return {"sinks": int(found.sum()), "ratio": float(norms.max() / norms.median())}


@torch.no_grad()
def collect_batch(model, inputs, family) -> dict:
    """``mmsink inspect``'s collector (``tools/diagnose.collect_batch``) over every sample of an unpadded
    batch, the tower's hidden states included. On a loaded CPU a batch of 16 costs about what one prompt
    does."""
    if "attention_mask" in inputs and not bool(inputs["attention_mask"].all()):
        raise ValueError("mmsink sink_criteria: prompts of one batch must have equal lengths (no padding)")
    return diagnose.collect_batch(model, inputs, family, tower=tower_of(model))


@torch.no_grad()
def measure(model, inputs, family, sink_dims, tau: float = 20.0, factor: float = 3.0) -> list[dict]:
    """Sink facts of each prompt of an unpadded batch (one image each): per LLM layer and for the tower's
    tokens."""
    ids = inputs["input_ids"]
    is_images = ids == model.config.image_token_id
    if not bool((is_images.sum(1) == model.config.image_seq_length).all()):
        raise ValueError("mmsink sink_criteria: every prompt needs exactly one image")
    data = collect_batch(model, inputs, family)
    cfg = VARConfig(sink_dims=tuple(sink_dims), tau=tau)
    last = data["tower"][-1]
    if model.config.vision_feature_select_strategy == "default":
        last = last[:, 1:]  # the patch tokens, as LLaVA reads them
    out = []
    for b, is_image in enumerate(is_images):
        after = ~is_image & (is_image.cumsum(0) > 0)  # instruction tokens: the text after the image
        if not after.any():
            raise ValueError("mmsink sink_criteria: a prompt needs text after its image")
        one = {"hidden": [h[b] for h in data["hidden"]], "probs": [p[b] for p in data["probs"]]}
        report = layer_report(one, is_image, is_image.shape[0] - 1, list(sink_dims), tau=tau)
        layers = []
        for layer, (h, p) in enumerate(zip(one["hidden"], one["probs"])):
            codes = key_codes(h[None], is_image[None], torch.ones_like(is_image[None]), cfg)[0]
            phi = sink_scores(h[None], range(h.shape[-1]))[0]  # VAR's phi over every channel
            top = int(phi.argmax())
            layers.append(
                {
                    "first_token": float(p[:, after, 0].mean()),  # mean over heads and instruction rows
                    "head_sink_rate": report[layer]["sink_rate"],  # inspect's: heads > 0.3 on token 0
                    "visual_sinks": int((codes == VISUAL_SINK).sum()),
                    "phi": float(phi[top]),
                    "phi_token": "first" if top == 0 else "image" if bool(is_image[top]) else "text",
                    "phi_channel": int(h[top].abs().argmax()),
                }
            )
        out.append(
            {
                "layers": layers,
                "vit_feature": vit_facts(data["vit"][b].float().norm(dim=-1), factor),  # projector input
                "vit_last": vit_facts(last[b].float().norm(dim=-1), factor),
            }
        )
    return out


def by_length(encoded: list[dict], size: int) -> list[tuple[list[int], dict]]:
    """Batches of equal-length prompts (no padding, so positions are each prompt's own): (indices, inputs)."""
    groups = {}
    for i, enc in enumerate(encoded):
        groups.setdefault(enc["input_ids"].shape[1], []).append(i)
    out = []
    for idx in groups.values():
        for s in range(0, len(idx), size):
            part = idx[s : s + size]
            out.append((part, {k: torch.cat([encoded[i][k] for i in part]) for k in encoded[part[0]]}))
    return out


# ----------------------------------------------------------------------------- the table


def aggregate(per_image: list[dict]) -> dict:
    n = len(per_image)
    layers = []
    for i in range(len(per_image[0]["layers"])):
        rows = [m["layers"][i] for m in per_image]
        phis = sorted(r["phi"] for r in rows)
        top = max(rows, key=lambda r: r["phi"])
        layers.append(
            {
                "layer": i,
                "first_token": sum(r["first_token"] for r in rows) / n,
                "head_sink_rate": sum(r["head_sink_rate"] for r in rows) / n,
                "visual_sink_share": sum(r["visual_sinks"] > 0 for r in rows) / n,
                "phi_max": phis[-1],
                "phi_median": phis[n // 2],
                "phi_max_at": f"{top['phi_token']} token, channel {top['phi_channel']}",
            }
        )
    vit = {}
    for key in ("vit_feature", "vit_last"):
        ratios = sorted(m[key]["ratio"] for m in per_image)
        vit[key] = {
            "share": sum(m[key]["sinks"] > 0 for m in per_image) / n,
            "ratio_median": ratios[n // 2],
            "ratio_max": ratios[-1],
        }
    return {"images": n, "layers": layers, "vit": vit}


def verdicts(facts: dict, num_layers: int) -> list[dict]:
    """One row per criterion: the measured number, what the issue asks, pass or fail."""
    lay, rows = facts["layers"], []

    def row(name, measured, needed, ok):
        rows.append({"criterion": name, "measured": measured, "needed": needed, "pass": bool(ok)})

    acc = facts.get("accuracy")
    if acc:
        full = acc["full"]["accuracy"]
        row("test accuracy", f"{full:.3f}", f">= {ACCURACY}", full >= ACCURACY)
        noise, blind = acc["noise"]["accuracy"], acc["blind_rate"]
        row(
            "noise-image accuracy",
            f"{noise:.3f} (blind guess {blind:.3f})",
            f"<= blind + {NOISE_MARGIN}",
            noise <= blind + NOISE_MARGIN,
        )
    late = [r for r in lay if r["layer"] > 1]
    hit = [r["layer"] for r in late if r["first_token"] >= FIRST_TOKEN]
    best = max(late, key=lambda r: r["first_token"]) if late else None
    row(
        "first-token sink",
        f"{len(hit)} of {len(late)} layers >= {FIRST_TOKEN} (max {best['first_token']:.3f}, layer "
        f"{best['layer']})"
        if best
        else "no layer after 1",
        f">= half of layers 2..{num_layers - 1}",
        late and 2 * len(hit) >= len(late),
    )
    cfg = VARConfig()
    middle = [r for r in lay if cfg.active(r["layer"], num_layers)]
    hit = [r for r in middle if r["visual_sink_share"] >= SINK_SHARE]
    shares = ", ".join(f"{r['visual_sink_share']:.2f}" for r in middle)
    phi = max(r["phi_max"] for r in lay)
    row(
        f"massive activations (VAR, tau {facts['tau']:g})",
        f"{len(hit)} of {len(middle)} middle layers (shares {shares}); max phi {phi:.1f}"
        + (f" (can reach at most sqrt(hidden) = {facts['phi_bound']:.1f})" if "phi_bound" in facts else ""),
        f"share >= {SINK_SHARE} in >= half of layers 2..{num_layers - 2}",
        middle and 2 * len(hit) >= len(middle),
    )
    for key, where in (("vit_feature", "vision_feature_layer"), ("vit_last", "last tower layer")):
        v = facts["vit"][key]
        row(
            f"ViT high-norm tokens ({where})",
            f"{v['share']:.3f} of images (max / median norm: median image {v['ratio_median']:.2f}, "
            f"max {v['ratio_max']:.2f})",
            f">= {VIT_SHARE}",
            v["share"] >= VIT_SHARE,
        )
    if acc:
        keep = acc["random"]["accuracy"] / max(acc["full"]["accuracy"], 1e-9)
        row(
            f"random pruning to {acc['budget']:g} keeps",
            f"{keep:.3f} ({acc['random']['accuracy']:.3f} / {acc['full']['accuracy']:.3f})",
            f">= {KEEP}",
            keep >= KEEP,
        )
    return rows


def markdown(result: dict) -> str:
    out = [
        f"# Issue 16 criteria: {result['model']} ({result['images']} test images)",
        "",
        "| criterion | measured | needed | pass |",
        "|---|---|---|---|",
    ]
    out += [
        f"| {r['criterion']} | {r['measured']} | {r['needed']} | {'pass' if r['pass'] else 'FAIL'} |"
        for r in result["criteria"]
    ]
    dims = result["calibration"]["sink_dims"]
    out += [
        "",
        f"Sink channels (mmsink calibrate, {result['calibration']['samples']} images): {dims} "
        f"({result['calibration']['sink_dims_rule']}).",
        "",
        "| layer | attention to token 0 (heads x instruction rows) | heads > 0.3 on token 0 (inspect) "
        "| images with a VAR visual sink | max phi (all channels) | median per-image max phi | where |",
        "|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {r['layer']} | {r['first_token']:.4f} | {r['head_sink_rate']:.3f} | {r['visual_sink_share']:.3f} "
        f"| {r['phi_max']:.2f} | {r['phi_median']:.2f} | {r['phi_max_at']} |"
        for r in result["layers"]
    ]
    acc = result.get("accuracy")
    if acc:
        out += ["", "| run | accuracy | questions |", "|---|---|---|"]
        for name in ("full", "noise", "random"):
            out.append(f"| {acc[name]['label']} | {acc[name]['accuracy']:.4f} | {acc[name]['n']} |")
        out.append(f"| blind guess (each category's most common answer) | {acc['blind_rate']:.4f} | |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- accuracy runs


def subset(bench: vqa.Bench, images: int, per_image: int | None = None) -> tuple[vqa.Bench, list[dict]]:
    """The first ``per_image`` questions (None: all) of each of the first ``images`` images, and the first
    question of each image."""
    of = {}
    for q in bench.questions:
        if q["image"] in of or len(of) < images:
            of.setdefault(q["image"], []).append(q)
    if len(of) < images:
        raise ValueError(f"mmsink sink_criteria: the benchmark has {len(of)} images, fewer than {images}")
    chosen = [q for qs in of.values() for q in qs[:per_image]]
    return vqa.Bench(bench.name, chosen, bench.images, bench.key), [qs[0] for qs in of.values()]


def blind_rate(bench: vqa.Bench) -> float:
    """Each category's most common answer: a blind model's best score."""
    from .scorers import normalize_answer

    key = {str(r["question_id"]): r for r in bench.key}
    by_cat = {}
    for q in bench.questions:
        a = key[q["qid"]]
        by_cat.setdefault(a.get("category", "all"), []).append(normalize_answer(a["answer"]))
    return sum(Counter(v).most_common(1)[0][1] for v in by_cat.values()) / len(bench.questions)


def noise_images(bench: vqa.Bench, folder: Path, seed: int) -> vqa.Bench:
    """The same questions on uniform-noise images (one per image name, seeded, the test images' size)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in dict.fromkeys(q["image"] for q in bench.questions):
        with Image.open(bench.images / name) as im:
            w, h = im.size
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if not (folder / name).exists():
            Image.fromarray(pixels).save(folder / name)
    return vqa.Bench(bench.name, bench.questions, folder, bench.key)


def accuracy_runs(model, processor, bench, work: Path, args, model_id) -> dict:
    from .eval import Settings, run_eval

    runs = {
        "full": (bench, Settings()),
        "noise": (noise_images(bench, work / "noise_images", args.seed), Settings()),
        "random": (bench, Settings("random", args.budget, {"seed": args.seed})),
    }
    out = {"budget": args.budget}
    for name, (b, settings) in runs.items():
        print(f"[accuracy] {name}: {len(b.questions)} questions", file=sys.stderr, flush=True)
        s = run_eval(
            model,
            processor,
            b,
            settings,
            work / f"{name}.jsonl",
            args.batch_size,
            args.max_new_tokens,
            model_id,
            args.seed,
            not args.no_progress,
        )
        label = settings.label() + (" on noise images" if name == "noise" else "")
        out[name] = {"label": label, **{k: s[k] for k in ("accuracy", "n", "per_category")}}
    out["blind_rate"] = blind_rate(bench)
    return out


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local LLaVA checkpoint folder")
    ap.add_argument("--images", type=int, default=200, help="test images (default 200)")
    ap.add_argument("--out", required=True, help="output path without suffix: writes OUT.json and OUT.md")
    ap.add_argument("--work", help="answers and noise images (default ~/.cache/mmsink/sink_criteria/<model>)")
    ap.add_argument("--scenes", type=int, default=vqa.SCENES, help="synthvqa test split size (default 700)")
    ap.add_argument("--cache", help="synthvqa cache root (default ~/.cache/mmsink)")
    ap.add_argument("--calib", type=int, default=16, help="images for mmsink calibrate (default 16)")
    ap.add_argument("--tau", type=float, default=20.0, help="VAR's sink threshold (paper: 20)")
    ap.add_argument("--factor", type=float, default=3.0, help="ViT sink: norm > factor x median (3)")
    ap.add_argument("--budget", type=float, default=0.33, help="random pruning fraction (default 0.33)")
    ap.add_argument(
        "--questions-per-image", type=int, default=None, help="accuracy runs: questions of each image (all)"
    )
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per forward (default 16)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="synthvqa seed, noise images, random pruner")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-accuracy", action="store_true", help="only the sink diagnostics")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if min(a.images, a.calib, a.batch_size, a.questions_per_image or 1) < 1:
        ap.error("--images, --calib, --batch-size and --questions-per-image must be >= 1")
    if not 0 < a.budget < 1:
        ap.error("--budget is a fraction in (0, 1)")
    from functools import partial

    from mmsink.patches import family_for
    from tqdm import tqdm

    tqdm = partial(tqdm, disable=a.no_progress)

    import mmsink
    from mmsink.tools.calibrate import calibrate
    from mmsink.tools.loading import LoadError, encode, load_model, open_image

    t0 = time.time()
    out = Path(a.out)
    model_id = Path(a.model).resolve().name
    weights = vqa.weights_id(a.model)  # answers of other weights under the same name are not resumed
    work = Path(a.work) if a.work else Path.home() / ".cache" / "mmsink" / "sink_criteria" / weights
    try:
        bench = vqa.load_bench("synthvqa", seed=a.seed, scenes=a.scenes, cache=a.cache)
        bench, firsts = subset(bench, a.images, a.questions_per_image)
        model, processor = load_model(a.model, a.device)
    except (ValueError, OSError, LoadError) as e:
        raise SystemExit(f"mmsink sink_criteria: error: {e}") from None
    family = family_for(model)
    num_layers = len(family.layers)

    def sample(q):
        image, why = open_image(bench.images / q["image"])
        if image is None:
            raise SystemExit(f"mmsink sink_criteria: error: {why}")
        return image, q["text"]

    print(f"[calibrate] mmsink calibrate on {min(a.calib, a.images)} images", file=sys.stderr, flush=True)
    calib = calibrate(model, processor, [sample(q) for q in firsts[: a.calib]], a.device)
    per_image = [None] * len(firsts)
    batches = by_length([encode(processor, *sample(q), a.device) for q in firsts], a.batch_size)
    bar = tqdm(
        total=len(firsts), desc="sink diagnostics", unit="image", file=sys.stderr, disable=a.no_progress
    )
    with bar:
        for idx, inputs in batches:
            for i, facts in zip(idx, measure(model, inputs, family, calib["sink_dims"], a.tau, a.factor)):
                per_image[i] = facts
            bar.update(len(idx))
    # phi = |h_d| / RMS(h) <= sqrt(hidden): a tau above that cannot flag anything at this width
    facts = {"tau": a.tau, "phi_bound": model.config.text_config.hidden_size**0.5, **aggregate(per_image)}
    if not a.no_accuracy:
        facts["accuracy"] = accuracy_runs(model, processor, bench, work, a, weights)
    result = {
        "command": "python -m evals.sink_criteria " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": model_id,
        "images": a.images,
        "questions": len(bench.questions),
        "bench": bench.name,
        "vision_feature_layer": model.config.vision_feature_layer,
        "tower_layers": model.config.vision_config.num_hidden_layers,
        "llm_layers": num_layers,
        "factor": a.factor,
        "calibration": calib,
        **facts,
        "criteria": verdicts(facts, num_layers),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {torch.get_num_threads()} threads",
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "mmsink": getattr(mmsink, "__version__", None),
            "python": platform.python_version(),
        },
        "seconds": round(time.time() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    Path(f"{out}.md").write_text(text)
    print(text)
    print(f"wrote {out}.json and {out}.md ({result['seconds']} s)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
