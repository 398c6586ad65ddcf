"""Does LFPS keep the sink ``<s>`` (slot 0)? Issue 17's probe on ``evals.kv_stream``'s stream.

The stream (``--images`` synthvqa images x 3 turns, seed 0) is fed one token per forward through LFPS
top-``--topk`` as ``evals.kv_stream --parts stream`` does. At every sparse step (more keys than top-k) and
layer, per query head: whether LFPS chose slot 0, whether slot 0 is in the exact top-k of the same query,
its dense softmax weight, and the dense mass on LFPS's choice and on the exact top-k. Per head: the first
step slot 0 left LFPS's choice, its weight then, and the steps on which LFPS chose it again.

Two modes: "rule" is LFPS as implemented (candidates from the previous step's choice only); "slot 0
always a candidate" (``--counterfactual``) adds slot 0 to every step's candidates (not LFPS's rule: a
test of the cause, the cache code is unchanged).

    python -m evals.lfps_sink --model models/synthllava-sinks --out evals/results/kv_stream/sinks/lfps_sink
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from unittest import mock

import torch

from mmsink.kv import sparse

from . import kv_stream


class SinkTrace:
    """A cache trace: per sparse step and layer, the per-head sink and mass figures (one sample)."""

    def __init__(self, topk: int, scaling: float, answer_steps: set):
        self.topk, self.scaling, self.answer_steps = topk, scaling, answer_steps
        self.rows: list = []

    def append(self, entry) -> None:
        step = kv_stream.exact_step(entry, self.topk, self.scaling)
        if step is None:
            return
        p, exact, chosen = step
        layer, t = entry[0], p.shape[1]
        self.rows.append(
            {
                "t": t,
                "layer": layer,
                "chosen": chosen[:, 0].tolist(),
                "exact": (exact == 0).any(1).tolist(),
                "p0": p[:, 0].tolist(),
                "mass_lfps": (p * chosen).sum(1).tolist(),
                "mass_exact": p.gather(1, exact).sum(1).tolist(),
            }
        )

    def summary(self) -> list:
        """Per layer: shares over (step, head), the answer steps' masses and each head's first loss."""
        out = []
        for layer in sorted({r["layer"] for r in self.rows}):
            rs = [r for r in self.rows if r["layer"] == layer]
            heads = len(rs[0]["p0"])
            cells = [(r, h) for r in rs for h in range(heads)]
            ans = [(r, h) for r, h in cells if r["t"] in self.answer_steps]

            def mean(xs):
                xs = list(xs)
                return sum(xs) / len(xs) if xs else None

            losses = []
            for h in range(heads):
                at = next((i for i, r in enumerate(rs) if not r["chosen"][h]), None)
                if at is None:
                    losses.append(None)
                    continue
                later = rs[at + 1 :]
                losses.append(
                    {
                        "t": rs[at]["t"],
                        "p0_at_loss": round(rs[at]["p0"][h], 4),
                        "p0_next_200": round(mean(r["p0"][h] for r in later[:200]) or 0.0, 3),
                        "exact_later": round(mean(r["exact"][h] for r in later) or 0.0, 3),
                        "chosen_later": round(mean(r["chosen"][h] for r in later) or 0.0, 3),
                    }
                )
            out.append(
                {
                    "layer": layer,
                    "steps": len(rs),
                    "chosen": mean(r["chosen"][h] for r, h in cells),
                    "exact": mean(r["exact"][h] for r, h in cells),
                    "exact_not_chosen": mean(r["exact"][h] and not r["chosen"][h] for r, h in cells),
                    "p0": mean(r["p0"][h] for r, h in cells),
                    "answers_p0": mean(r["p0"][h] for r, h in ans),
                    "answers_mass_lfps": mean(r["mass_lfps"][h] for r, h in ans),
                    "answers_mass_exact": mean(r["mass_exact"][h] for r, h in ans),
                    "first_loss": losses,
                }
            )
        return out


def with_slot0(candidates):
    """``candidates`` with slot 0 added to every head's history (the counterfactual)."""

    def wrapped(hist, t, expand, width=None):
        return candidates(torch.cat([hist, hist.new_zeros(*hist.shape[:2], 1)], 2), t, expand, width)

    return wrapped


def run(model, processor, args, counterfactual: bool) -> dict:
    from .synthvqa import make_questions, make_scenes, render_scene

    scenes = make_scenes("test", args.images, args.seed)
    qs, ans = make_questions(scenes, "test", args.seed, questions_per_scene=3)
    shown, turns = set(), []
    for q, a in zip(qs, ans, strict=True):
        image = None if q["image"] in shown else render_scene(scenes[len(shown)])
        shown.add(q["image"])
        turns.append((image, q["text"], a["answer"]))
    inputs, _, answer = kv_stream.build(processor, turns)
    ids = inputs["input_ids"][0]
    embeds = kv_stream.embeds_of(model, inputs)
    steps = set(torch.nonzero(answer)[:, 0].tolist())  # a step holding t keys predicts token t
    trace = SinkTrace(args.topk, model.config.text_config.head_dim**-0.5, steps)
    patch = mock.patch.object(sparse, "candidates", with_slot0(sparse.candidates)) if counterfactual else None
    if patch:
        patch.start()
    try:
        kv = {"sparse": "lfps", "topk": args.topk}
        logits = kv_stream.feed(model, embeds, list(range(len(ids) + 1)), kv, trace)
    finally:
        if patch:
            patch.stop()
    nll, right, n = kv_stream.scores(logits, ids, answer)
    mode = f"lfps top-{args.topk}" + (", slot 0 always a candidate" if counterfactual else "")
    row = {"mode": mode, "tokens": len(ids), "ppl_answers": math.exp(nll / n), "acc_answers": right / n}
    return dict(row, layers=trace.summary())


def table(result: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    out = [
        "# Does LFPS keep the sink? (issue 17)",
        "",
        f"`{result['command']}`",
        "",
        f"{result['machine']}; torch {result['torch']}, transformers {result['transformers']}. Stream: "
        f"{result['rows'][0]['tokens']} tokens fed one per forward, dense steps only at the start "
        "(no multi-token forward re-seeds the history).",
        "",
        "Per layer, over sparse steps x 8 heads: share of head-steps where LFPS chose slot 0 / where slot 0 "
        "is in the exact top-k of the same query / in the exact top-k but not chosen; dense weight on slot "
        "0; on the answer steps, dense mass on LFPS's keys and on the exact top-k; heads that lost slot 0 "
        "(first loss) and its weight at that step / over the next 200 steps (means over those heads).",
        "",
    ]
    for row in result["rows"]:
        out += [
            f"## {row['mode']}: answer ppl {row['ppl_answers']:.2f}, right {row['acc_answers']:.2f}",
            "",
            "| layer | chosen | in exact | exact, not chosen | p0 | answers: mass LFPS | mass exact "
            "| heads lost | p0 at loss | p0 next 200 | chosen after loss |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in row["layers"]:
            lost = [y for y in x["first_loss"] if y]
            m = {k: sum(y[k] for y in lost) / len(lost) for k in (lost[0] if lost else {})}
            cols = [x[k] for k in ("chosen", "exact", "exact_not_chosen", "p0", "answers_mass_lfps")]
            cols += [x["answers_mass_exact"]]
            after = [m.get(k) for k in ("p0_at_loss", "p0_next_200", "chosen_later")]
            heads = f"{len(lost)} / {len(x['first_loss'])}"
            out.append(f"| {x['layer']} | " + " | ".join([*map(f, cols), heads, *map(f, after)]) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/synthllava-sinks")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--counterfactual", action="store_true", help="also run with slot 0 always a candidate")
    p.add_argument("--out", default="evals/results/kv_stream/sinks/lfps_sink")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    result = {
        "command": "python -m evals.lfps_sink " + " ".join(argv),
        "machine": "CPU, 2 cores, shared with other jobs (one torch thread)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": vars(args),
        "rows": [],
    }
    with torch.no_grad():
        for cf in (False, True) if args.counterfactual else (False,):
            row = run(model, processor, args, cf)
            print(f"[lfps_sink] {row['mode']}: ppl {row['ppl_answers']:.2f}, right {row['acc_answers']:.3f}")
            result["rows"].append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lfps_sink.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "lfps_sink.md").write_text(table(result))


if __name__ == "__main__":
    main()
