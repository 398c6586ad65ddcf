"""Does OrthoRank's premise hold on a reference model? Per LLM layer, on synthvqa test questions (issue 18).

OrthoRank (Shin et al., ICML 2025) rests on two observations: the sink token's normalised state barely
changes with depth, and the other tokens' states turn towards it, so 1 - |cos(x_i, x_sink)| says which
tokens a layer still has work on. Per layer l (x = layers[l].input_layernorm(h), the state the layer
reads; the sink is token 0, prompts run one at a time so there is no padding), from the plain model:

- sink drift: cos(x_sink at l, x_sink at l - 1) (near 1: the sink's state is fixed);
- mean |cos(x_i, x_sink)| over the visual tokens, the system prompt's (text before the image) and the
  question's (text after it, without the last prompt token) (rising: tokens turn to it);
- the spread (std) of the score over the visual tokens;
- ||h_sink|| / median ||h_j|| and the last prompt token's attention to token 0 (mean over heads);
- the overlap (Jaccard) of the visual tokens OrthoRank keeps at K = 2 with those FastV keeps (the last
  prompt token's attention in layer 1, mean over heads), budget ``--budget``; two random sets of that
  size overlap by about k / (2n - k).

And from ``wrap(model, orthorank={"budget": r})`` for each r in ``--layers-budgets``: per selection layer,
the shares of the visual, system-prompt and question tokens that the layer updates
(``stats(model).extra["orthorank"]["updated_indices"]``).

    python -m evals.orthorank_premise --model models/synthllava-sinks --questions 32 \
        --out evals/results/orthorank/premise/synthllava-sinks
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mmsink
from mmsink.tools.loading import load_model, prompt_for

from .synthvqa import make_questions, make_scenes, render_scene


def token_kinds(model, enc):
    """Masks of the visual tokens, the text before the image (system prompt) and the text after it (the
    question), without token 0 (the sink) and the last prompt token (always updated)."""
    vis = enc["input_ids"][0] == model.config.image_token_index
    pos = torch.arange(len(vis))
    first, last = pos[vis].min(), pos[vis].max()
    pre = (pos > 0) & (pos < first)
    post = (pos > last) & (pos < len(vis) - 1)
    return vis, pre, post


def per_question(model, enc, budget: float, k_layer: int) -> dict:
    lm = model.model.language_model
    out = model(**enc, output_hidden_states=True, output_attentions=True)
    hs, att = out.hidden_states, out.attentions  # hs[l]: the state entering layer l (l < L)
    vis, pre, post = token_kinds(model, enc)
    rows, prev = [], None
    for layer in range(len(lm.layers)):
        x = F.normalize(lm.layers[layer].input_layernorm(hs[layer])[0].float(), dim=-1)
        cos = x @ x[0]
        norms = hs[layer][0].float().norm(dim=-1)
        rows.append(
            {
                "sink_drift": None if prev is None else float(x[0] @ prev),
                "abs_cos_visual": float(cos[vis].abs().mean()),
                "abs_cos_system": float(cos[pre].abs().mean()),
                "abs_cos_question": float(cos[post].abs().mean()),
                "score_std_visual": float((1 - cos.abs())[vis].std()),
                "sink_norm_over_median": float(norms[0] / norms.median()),
                "last_token_attn_to_sink": float(att[layer][0, :, -1, 0].mean()),
            }
        )
        prev = x[0]
    n = int(vis.sum())
    k = math.ceil(budget * n)
    x = F.normalize(lm.layers[k_layer].input_layernorm(hs[k_layer])[0].float(), dim=-1)
    ortho = (1 - (x @ x[0]).abs())[vis].topk(k).indices
    fastv = att[k_layer - 1][0, :, -1].mean(0)[vis].topk(k).indices
    a, b = set(ortho.tolist()), set(fastv.tolist())
    return {"layers": rows, "jaccard_fastv": len(a & b) / len(a | b), "jaccard_random": k / (2 * n - k)}


def updated_shares(model, enc, ratio: float) -> dict:
    """Per selection layer of the per-layer form: the shares of the visual, system and question tokens
    it updates."""
    vis, pre, post = token_kinds(model, enc)
    mmsink.wrap(model, orthorank={"budget": ratio})
    try:
        model(**enc)
        chosen = mmsink.stats(model).extra["orthorank"]["updated_indices"]
    finally:
        mmsink.unwrap(model)
    out = {}
    for layer, per in chosen.items():
        upd = torch.zeros_like(vis)
        upd[per[0]] = True
        out[int(layer)] = [float(upd[m].float().mean()) for m in (vis, pre, post)]
    return out


def mean_rows(per: list, key: str) -> list:
    rows = [r[key] for r in per]
    return [
        {
            f: None if rows[0][i][f] is None else round(statistics.mean(r[i][f] for r in rows), 4)
            for f in rows[0][i]
        }
        for i in range(len(rows[0]))
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.333, help="visual form / FastV: visual tokens kept")
    p.add_argument("--layers-budgets", default="0.6,0.3", help="per-layer form: fractions updated")
    p.add_argument("--layer", type=int, default=2, help="OrthoRank's K (FastV's too)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    a = p.parse_args(argv)
    ratios = [float(r) for r in a.layers_budgets.split(",")]
    if a.questions < 1 or not 0 < a.budget <= 1 or not all(0 < r <= 1 for r in ratios):
        raise SystemExit("--questions must be >= 1, --budget and --layers-budgets in (0, 1]")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model, processor = load_model(a.model, "cpu", "float32")
    model.set_attn_implementation("eager")  # attention weights for the sink share and FastV's score
    scenes = make_scenes("test", a.questions, a.seed)
    questions, _ = make_questions(scenes, "test", a.seed, questions_per_scene=1)
    per, shares = [], {r: [] for r in ratios}
    with torch.inference_mode():
        for q, s in zip(questions[: a.questions], scenes, strict=False):
            text = [prompt_for(processor, q["text"])]
            enc = processor(images=[render_scene(s)], text=text, return_tensors="pt")
            per.append(per_question(model, enc, a.budget, a.layer))
            for r in ratios:
                shares[r].append(updated_shares(model, enc, r))
    updated = {
        str(r): {
            str(layer): {
                kind: round(statistics.mean(q[layer][i] for q in qs), 3)
                for i, kind in enumerate(("visual", "system", "question"))
            }
            for layer in qs[0]
        }
        for r, qs in shares.items()
    }
    res = {
        "command": "python -m evals.orthorank_premise " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": a.model,
        "questions": a.questions,
        "budget": a.budget,
        "layer": a.layer,
        "layers": mean_rows(per, "layers"),
        "jaccard_fastv": round(statistics.mean(r["jaccard_fastv"] for r in per), 4),
        "jaccard_random": round(statistics.mean(r["jaccard_random"] for r in per), 4),
        "updated_shares": updated,
        "machine": f"CPU ({platform.machine()}), 2 cores, shared with other jobs; torch threads {a.threads}",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    write_md(out.with_suffix(".md"), res, a)


def write_md(path: Path, res: dict, a) -> None:
    lines = [
        f"# OrthoRank's premise on {a.model} ({a.questions} synthvqa test questions, one at a time)",
        "",
        "x = the layer's input norm of the state entering it; sink = token 0; means over questions.",
        "",
        "| layer | sink drift cos(x_0^l, x_0^(l-1)) | mean \\|cos\\| to sink: visual | system | question "
        "| score std, visual | \\|\\|h_0\\|\\| / median | last token's attention to token 0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(res["layers"]):
        drift = "" if r["sink_drift"] is None else r["sink_drift"]
        lines.append(
            f"| {i} | {drift} | {r['abs_cos_visual']} | {r['abs_cos_system']} | {r['abs_cos_question']} | "
            f"{r['score_std_visual']} | "
            f"{r['sink_norm_over_median']} | {r['last_token_attn_to_sink']} |"
        )
    lines += [
        "",
        f"Visual tokens kept at K = {a.layer}, budget {a.budget}: Jaccard overlap of OrthoRank's set with "
        f"FastV's {res['jaccard_fastv']} (two random sets of that size: {res['jaccard_random']}).",
        "",
        'The per-layer form (`wrap(model, orthorank={"budget": r})`): share of the visual / system-prompt '
        "(before the image) / question (after it) tokens each selection layer updates (token 0 and the last "
        "prompt token left out):",
        "",
        "| r | " + " | ".join(f"layer {k}" for k in next(iter(res["updated_shares"].values()))) + " |",
        "|---|" + "---|" * len(next(iter(res["updated_shares"].values()))),
    ]
    for r, per_layer in res["updated_shares"].items():
        cells = [f"{v['visual']} / {v['system']} / {v['question']}" for v in per_layer.values()]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Command: `{res['command']}`; {res['machine']}; torch {res['versions']['torch']}, transformers "
        f"{res['versions']['transformers']}; {res['seconds']} s.",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
