"""``mmsink calibrate``: find a model's sink dimensions, typical fusion layer and ViT-sink threshold from a
few sample inputs, and write a config file that ``mmsink.wrap(model, config=path)`` reads, so that a new
model needs no hand-tuned constants.

    mmsink calibrate --model PATH --data questions.jsonl --images DIR --limit 16 --out calib.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch

from .diagnose import collect, massive_dims, top_outlier_dims
from .loading import DTYPES, LoadError, check_out_file, encode, fail, load_model, open_image, parser


def read_samples(data, images, limit):
    """(image, question) pairs from a LLaVA questions file, read by eval's tolerant reader: bad records
    are reported by line on stderr and skipped; a missing file or no usable record is a LoadError."""
    from mmsink.evals import vqa

    data = Path(data)
    if not data.is_file():
        raise LoadError(f"--data {data}: no such file (a questions JSONL: question_id, image, text)")
    try:
        rows = vqa.read_jsonl(data)
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"--data {data}: unreadable ({e})") from None
    questions, problems = vqa.check_questions(rows, data.name)
    out = []
    for q in questions:
        if len(out) >= limit:
            break
        image, why = open_image(Path(images) / q["image"])
        if image is None:
            problems.append(vqa.problem(data.name, why, q["question_id"], q["line"]))
            continue
        out.append((image, q["text"]))
    for p in problems:
        print("mmsink calibrate: skipped " + vqa.describe(p), file=sys.stderr)
    if not out:
        raise LoadError(f"--data {data}: no usable sample ({len(problems)} bad record(s))")
    return out


def vit_threshold(norms: torch.Tensor, ratio: float = 1.5):
    """Midpoint of the largest gap among the top 10% of token norms, when the gap separates clearly
    (upper / lower > ratio); None means no clear sinks (use the adaptive rule)."""
    x = norms.flatten().float().sort().values
    top = x[int(0.9 * len(x)) :]
    if len(top) < 2:
        return None
    gaps = top[1:] / top[:-1].clamp(min=1e-6)
    i = int(gaps.argmax())
    return float((top[i] + top[i + 1]) / 2) if float(gaps[i]) > ratio else None


def calibrate(model, processor, samples, device="cpu") -> dict:
    import mmsink

    from ..patches import family_for

    family = family_for(model)
    dims, hidden_all, norms = Counter(), [], []
    for image, question in samples:
        data = collect(model, encode(processor, image, question, device), family)
        for hits in massive_dims(data["hidden"]).values():
            dims.update(d for _, d, _ in hits)
        hidden_all += data["hidden"]
        if data["vit_norms"] is not None:
            norms.append(data["vit_norms"].flatten())
    n_layers = len(family.layers)
    if dims:
        sink_dims, rule = (
            [d for d, _ in dims.most_common(4)],
            "massive activations (|h| > 100, > 1000x median)",
        )
    else:
        sink_dims, rule = (
            top_outlier_dims(hidden_all, k=2),
            "most frequent outlier channel (no massive activation)",
        )
    fusion = []
    mmsink.wrap(model, prune="visipruner")
    try:
        for image, question in samples:
            with torch.no_grad():
                model(**encode(processor, image, question, device))
            fusion += [f for f in mmsink.stats(model).extra.get("fusion_layer", []) if f >= 0]
    finally:
        mmsink.unwrap(model)
    fusion_layer = int(sorted(fusion)[len(fusion) // 2]) if fusion else None
    return {
        "model_type": model.config.model_type,
        "num_layers": n_layers,
        "samples": len(samples),
        "sink_dims": sink_dims,
        "sink_dims_rule": rule,
        "fusion_layer": fusion_layer,
        "fusion_layers_seen": fusion,
        "vit_sink_threshold": vit_threshold(torch.cat(norms)) if norms else None,
    }


def main(argv=None):
    ap = parser("calibrate", __doc__)
    ap.add_argument("--model", required=True, help="local checkpoint folder (LLaVA, LLaVA-NeXT, Qwen2-VL)")
    ap.add_argument("--data", required=True, help="questions JSONL (LLaVA format: question_id, image, text)")
    ap.add_argument("--images", required=True, help="folder the data file's image names are relative to")
    ap.add_argument("--limit", type=int, default=16, help="use the first N usable samples (default 16)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)")
    ap.add_argument("--out", required=True, help="calibration file to write (JSON)")
    a = ap.parse_args(argv)
    if a.limit < 1:
        ap.error("--limit must be >= 1")
    try:
        out = check_out_file(a.out)
        samples = read_samples(a.data, a.images, a.limit)
        model, processor = load_model(a.model, a.device, a.dtype)
        result = calibrate(model, processor, samples, a.device)
        out.write_text(json.dumps(result, indent=1))
    except (LoadError, OSError) as e:
        fail("calibrate", e)
    print(json.dumps(result, indent=1))
    return result
