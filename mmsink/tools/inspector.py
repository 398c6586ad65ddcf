"""``mmsink inspect``: per-layer sink diagnostics for one image and question, as JSON and PNG plots.

    mmsink inspect --model PATH --image IMG --question Q [--sink-dims 1415,2533] --out DIR

Per layer: massive activations (which dims, which tokens), VAR sink tokens, per-head sink rate (mass on
the first token > 0.3), image-centric heads at the last prompt token, text->image attention mass,
VisiPruner's contribution test (the three-stage curve), and the ViT token norms; per head, active or
dormant (``heads.py``), with the image and for the same question without it (heads.png).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .diagnose import collect, contribution_curve, layer_report, massive_dims, top_outlier_dims
from .heads import heads_section, plot_heads
from .loading import DTYPES, LoadError, check_out_dir, encode, fail, load_model, open_image, parser


@torch.no_grad()
def inspect_model(model, processor, image, question, sink_dims=None, device="cpu", tau=20.0) -> dict:
    from ..patches import family_for

    family = family_for(model)
    inputs = encode(processor, image, question, device)
    data = collect(model, inputs, family)
    is_image = inputs["input_ids"][0] == model.config.image_token_id
    anchor = is_image.shape[0] - 1
    massive = massive_dims(data["hidden"])
    found = sorted({d for hits in massive.values() for _, d, _ in hits})
    dims = list(sink_dims) if sink_dims else (found or top_outlier_dims(data["hidden"], k=2))
    norms = data["vit_norms"]
    return {
        "question": question,
        "tokens": int(is_image.shape[0]),
        "image_tokens": int(is_image.sum()),
        "massive_activations": {str(k): v for k, v in massive.items()},
        "sink_dims": dims,
        "layers": layer_report(data, is_image, anchor, dims, tau=tau),
        "contribution": contribution_curve(model, data, family, is_image, anchor),
        "vit_norms": None
        if norms is None
        else {
            "median": float(norms.median()),
            "max": float(norms.max()),
            "top": sorted(norms.flatten().tolist(), reverse=True)[:10],
        },
        "_vit_norms_all": None if norms is None else norms.flatten().tolist(),
        "heads": heads_section(model, processor, question, family, data, device),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in report["layers"]]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax[0, 0].plot(layers, [r.get("text_to_image_mass", 0) for r in report["layers"]], marker="o")
    ax[0, 0].set_title("text -> image attention mass")
    ax[0, 1].plot(layers, [c["min_cos"] for c in report["contribution"]], marker="o")
    ax[0, 1].set_title("min cos(o - c_j, o) at the last token (VisiPruner)")
    ax[1, 0].plot(layers, [r["sink_rate"] for r in report["layers"]], marker="o")
    ax[1, 0].set_title("heads with > 0.3 mass on token 0")
    if report["_vit_norms_all"]:
        ax[1, 1].hist(report["_vit_norms_all"], bins=50)
    ax[1, 1].set_title("ViT token norms (projector input)")
    for a in ax.flat:
        a.set_xlabel("layer")
    ax[1, 1].set_xlabel("norm")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    ap = parser("inspect", __doc__)
    ap.add_argument("--model", required=True, help="local checkpoint folder (LLaVA, LLaVA-NeXT, Qwen2-VL)")
    ap.add_argument("--image", required=True, help="image file")
    ap.add_argument("--question", required=True, help="question about the image")
    ap.add_argument("--sink-dims", default=None, help="comma-separated channels (default: found)")
    ap.add_argument("--tau", type=float, default=20.0, help="VAR sink threshold on |x_d| / RMS(x)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)")
    ap.add_argument("--out", default="inspect", help="output folder for inspect.json and inspect.png")
    a = ap.parse_args(argv)
    try:
        dims = [int(d) for d in a.sink_dims.split(",")] if a.sink_dims else None
    except ValueError:
        ap.error(f"--sink-dims takes comma-separated channel numbers, got {a.sink_dims!r}")
    try:
        out = check_out_dir(a.out)
        image, why = open_image(a.image)
        if image is None:
            raise LoadError(why)
        model, processor = load_model(a.model, a.device, a.dtype)
        report = inspect_model(model, processor, image, a.question, dims, a.device, a.tau)
        out.mkdir(parents=True, exist_ok=True)
        plot(report, out / "inspect.png")
        plot_heads(report["heads"], out / "heads.png")
        report.pop("_vit_norms_all")
        (out / "inspect.json").write_text(json.dumps(report, indent=1))
    except (LoadError, OSError) as e:
        fail("inspect", e)
    print(f"wrote {out / 'inspect.json'}, {out / 'inspect.png'} and {out / 'heads.png'}")
    return report
