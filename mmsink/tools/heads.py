"""Active / dormant attention heads (Guo et al., "Active-Dormant Attention Heads") for ``mmsink inspect``.

Per layer and head, on one input (sample 0 of what ``diagnose.collect`` gathered):

- ``sink_mass``: the head's mean attention on the sink (the first token) over the query rows 1..n-1 (row 0
  can only attend to itself, so it is left out);
- ``value_ratio``: the value-state drain, ||v_sink W_O^h|| / median_j ||v_j W_O^h|| over the other tokens j
  (v from the layer's own input norm and v_proj, W_O^h the head's columns of o_proj);
- ``dormant``: sink_mass >= MASS and value_ratio <= DRAIN. With both, what the head writes into the
  residual stream is at most MASS_LEFT + MASS * DRAIN ~ 0.3 + 0.14 of a typical token's value (and
  usually far less: real models put >= 0.9 on the sink with ratios near 0.05): the head is parked on a
  near-zero vector. A head that parks on the sink but whose sink value is not small (``sink_only``) is
  reported apart, as it still writes the sink's value everywhere.

Per layer: the sink's residual-state peak, ||h_sink|| / median_j ||h_j|| of the states entering the layer,
and the token of largest norm. ``compare`` puts an image question beside the same question without the
image: which heads change state between the two.
"""

from __future__ import annotations

import torch

MASS = 0.7  # attention on the sink: more than two thirds of every row's mass (Gu et al.'s sink rate uses 0.3)
DRAIN = 0.2  # the sink's output-projected value at most a fifth of a typical token's


@torch.no_grad()
def value_out_norms(layer, h: torch.Tensor) -> torch.Tensor:
    """[H, n]: ||v_j W_O^h|| for every head h and token j of the states ``h`` [n, D] entering ``layer``."""
    attn = layer.self_attn
    x = layer.input_layernorm(h[None])
    n, hd = x.shape[1], attn.head_dim
    v = attn.v_proj(x).view(n, -1, hd).float()  # [n, Hkv, d]
    wo = attn.o_proj.weight.float()  # [D, H*d]
    heads = wo.shape[1] // hd
    v = v.repeat_interleave(heads // v.shape[1], 1)  # grouped-query: a key/value head serves its group
    wo = wo.view(wo.shape[0], heads, hd)  # [D, H, d]
    gram = torch.einsum("ehd,ehc->hdc", wo, wo)  # W_O^h^T W_O^h: no [H, n, D] product (NeXT: n ~ 3000)
    return torch.einsum("nhd,hdc,nhc->hn", v, gram, v).clamp_min(0).sqrt()


def classify(probs: torch.Tensor, vo: torch.Tensor, sink: int = 0, mass=MASS, drain=DRAIN) -> dict:
    """Per head of one layer, from its attention ``probs`` [H, n, n] and ``vo`` [H, n] (value_out_norms)."""
    h, n = vo.shape
    rows = probs[:, sink + 1 :, sink].float()  # query rows after the sink
    sink_mass = rows.mean(-1) if rows.shape[1] else torch.ones(h)
    others = torch.cat([vo[:, :sink], vo[:, sink + 1 :]], 1)
    typical = others.median(-1).values if others.shape[1] else vo[:, sink]
    ratio = vo[:, sink] / typical.clamp_min(1e-12)
    parked = sink_mass >= mass
    dormant = parked & (ratio <= drain)
    return {
        "sink_mass": [round(float(x), 4) for x in sink_mass],
        "value_ratio": [round(float(x), 4) for x in ratio],
        "dormant": dormant.tolist(),
        "sink_only": (parked & ~dormant).tolist(),
    }


def residual_peak(hidden: torch.Tensor, sink: int = 0) -> dict:
    """||h_sink|| against the other tokens' median norm, for the states [n, D] entering one layer."""
    norms = hidden.float().norm(dim=-1)
    others = torch.cat([norms[:sink], norms[sink + 1 :]])
    med = float(others.median()) if others.numel() else float(norms[sink])
    return {
        "sink_norm": round(float(norms[sink]), 4),
        "median_norm": round(med, 4),
        "peak_ratio": round(float(norms[sink]) / max(med, 1e-12), 4),
        "max_norm_token": int(norms.argmax()),
    }


def head_report(data: dict, layers, sink: int = 0) -> list[dict]:
    """Per layer: the heads' classification and the sink's residual peak (``data``: ``diagnose.collect``)."""
    out = []
    for i, (h, p) in enumerate(zip(data["hidden"], data["probs"])):
        row = {"layer": i, **classify(p, value_out_norms(layers[i], h), sink), **residual_peak(h, sink)}
        row["dormant_heads"] = [j for j, d in enumerate(row["dormant"]) if d]
        out.append(row)
    return out


def compare(image: list[dict], text: list[dict]) -> dict:
    """How heads change between an image question (``image``) and the text-only one (``text``)."""
    per_layer = []
    for a, b in zip(image, text):
        da, db = set(a["dormant_heads"]), set(b["dormant_heads"])
        per_layer.append(
            {
                "layer": a["layer"],
                "dormant_image": len(da),
                "dormant_text": len(db),
                "woken_by_image": sorted(db - da),  # dormant on text, active with the image
                "dormant_with_image": sorted(da - db),
                "peak_ratio_image": a["peak_ratio"],
                "peak_ratio_text": b["peak_ratio"],
            }
        )
    heads = sum(len(a["dormant"]) for a in image)
    return {
        "dormant_fraction_image": sum(r["dormant_image"] for r in per_layer) / max(heads, 1),
        "dormant_fraction_text": sum(r["dormant_text"] for r in per_layer) / max(heads, 1),
        "changed_heads": sum(len(r["woken_by_image"]) + len(r["dormant_with_image"]) for r in per_layer),
        "layers": per_layer,
    }


def text_only_inputs(processor, question: str, device) -> dict:
    """The same question without the image, in the processor's chat template."""
    tok = getattr(processor, "tokenizer", processor)
    if getattr(processor, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "text", "text": question}]}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    else:
        from mmsink.evals.reference_model import IMAGE_TOKEN, prompt_text

        text = prompt_text(question).replace(IMAGE_TOKEN + "\n", "")
    enc = tok([text], return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def plot_heads(report: dict, path) -> None:
    """Heat maps (layers x heads) of the sink mass, image and text-only, dormant heads marked; the sink's
    residual peak per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [(k, report[k]) for k in ("image", "text") if report.get(k)]
    fig, ax = plt.subplots(1, len(runs) + 1, figsize=(4.5 * (len(runs) + 1), 4))
    for a, (name, rows) in zip(ax, runs):
        mass = [r["sink_mass"] for r in rows]
        im = a.imshow(mass, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower")
        pts = [(j, r["layer"]) for r in rows for j in r["dormant_heads"]]
        if pts:
            a.scatter(*zip(*pts), marker="x", color="red", s=18)
        a.set_title(f"sink mass per head ({name}); x = dormant")
        a.set_xlabel("head")
        a.set_ylabel("layer")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=a)
    for name, rows in runs:
        ax[-1].plot([r["layer"] for r in rows], [r["peak_ratio"] for r in rows], marker="o", label=name)
    ax[-1].set_title("||h_sink|| / median ||h_j||")
    ax[-1].set_xlabel("layer")
    ax[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    ax[-1].set_yscale("log")
    ax[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def heads_section(model, processor, question: str, family, data: dict, device="cpu") -> dict:
    """The JSON's ``heads``: the image question (``data``, already collected) and the text-only one."""
    from .diagnose import collect

    text = collect(model, text_only_inputs(processor, question, device), family)
    image_rows, text_rows = head_report(data, family.layers), head_report(text, family.layers)
    return {
        "sink_token": 0,
        "thresholds": {"sink_mass": MASS, "value_ratio": DRAIN},
        "image": image_rows,
        "text": text_rows,
        "compare": compare(image_rows, text_rows),
    }
