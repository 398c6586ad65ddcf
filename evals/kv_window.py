"""Perplexity of a long multimodal chat under the sink + window KV cache (issue 17, StreamingLLM's figure).

One conversation of ``--turns`` synthvqa images, ``--questions`` question/answer turns each, is fed one
token at a time, as the paper does, through ``mmsink.wrap(model, kv={"window": W, "sinks": S})``;
the full cache is the plain model over the whole stream in one pass. Perplexity is over the text
tokens of the answers (what the model was trained to predict; its chat template's text is not),
overall and past the model's trained context, and the share of answer tokens predicted right.

    python -m mmsink.evals.kv_window --model models/synthllava --turns 6 --questions 3 \
        --windows 128,256,512 --sinks 0,4 --out evals/results/kv_window
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import mmsink


def conversation(processor, turns: int, seed: int, per_image: int):
    from .synthvqa import make_questions, make_scenes, render_scene

    scenes = make_scenes("test", turns, seed)
    questions, answers = make_questions(scenes, "test", seed, questions_per_scene=per_image)
    msgs, shown, n_img = [], set(), []
    for q, a in zip(questions, answers, strict=True):
        content = [{"type": "text", "text": q["text"]}]
        if q["image"] not in shown:  # an image's first question shows it; its next ones follow in text
            shown.add(q["image"])
            content.insert(0, {"type": "image"})
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": str(a["answer"])}]})
        n_img.append(len(shown))
    images = [render_scene(s) for s in scenes]
    inputs = processor(images=images, text=processor.apply_chat_template(msgs), return_tensors="pt")
    ids = inputs["input_ids"][0]
    answer = torch.zeros(len(ids), dtype=torch.bool)  # the answer tokens (with </s>): what the model learnt
    for i in range(len(n_img)):
        start = processor.apply_chat_template(msgs[: 2 * i + 1], add_generation_prompt=True)
        end = processor.apply_chat_template(msgs[: 2 * i + 2])
        a, b = (len(processor(images=images[: n_img[i]], text=t)["input_ids"][0]) for t in (start, end))
        full = processor(images=images[: n_img[i]], text=end)["input_ids"][0]
        assert list(full) == ids[:b].tolist(), "the conversation's prefix tokenizes differently"
        answer[a:b] = True
    return inputs, answer


def stream_embeds(model, inputs):
    """The language model's input embeddings of the whole stream (image features in place) and the
    full-cache logits, from one plain forward."""
    seen = {}
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True)
    try:
        logits = model(**inputs, use_cache=False).logits[0]
    finally:
        h.remove()
    return seen["e"], logits


def streamed_logits(model, embeds, kv):
    mmsink.wrap(model, kv=kv)
    try:
        cache, rows = None, []
        for t in range(embeds.shape[1]):
            out = model(inputs_embeds=embeds[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[0, -1])
        return torch.stack(rows), int(cache.valid.sum())
    finally:
        mmsink.unwrap(model)


def perplexities(logits, ids, answer, context: int) -> dict:
    logp = torch.log_softmax(logits[:-1].float(), -1)
    nll = -logp.gather(1, ids[1:, None])[:, 0]
    right = logits[:-1].argmax(-1) == ids[1:]
    ans = answer[1:]
    late = ans & (torch.arange(1, len(ids)) >= context)

    def ppl(sel):
        return math.exp(float(nll[sel].mean())) if bool(sel.any()) else None

    return {
        "ppl_answers": ppl(ans),
        "ppl_answers_past_context": ppl(late),
        "answer_token_acc": float(right[ans].float().mean()),
        "n_answer_tokens": int(ans.sum()),
        "n_past_context": int(late.sum()),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/synthllava")
    p.add_argument("--turns", type=int, default=6, help="images, each shown with its first question")
    p.add_argument("--questions", type=int, default=3, help="questions (turns) per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", default="256,512")
    p.add_argument("--sinks", default="0,4")
    p.add_argument("--out", default="evals/results/kv_window")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    inputs, answer = conversation(processor, args.turns, args.seed, args.questions)
    ids = inputs["input_ids"][0]
    context = model.config.text_config.max_position_embeddings
    image_token = model.config.image_token_id
    out = Path(args.out)
    saved = out / "kv_window.json"
    done = json.loads(saved.read_text())["rows"] if saved.exists() else []
    rows = [r for r in done if r["cache"] != "full"]  # resumable: measured settings are kept (same command)
    with torch.no_grad():
        embeds, full = stream_embeds(model, inputs)
        rows.insert(0, {"cache": "full", "window": None, "sinks": None, "kept": len(ids)})
        rows[0].update(perplexities(full, ids, answer, context))
        for w in map(int, args.windows.split(",")):
            for s in map(int, args.sinks.split(",")):
                if any(r["window"] == w and r["sinks"] == s for r in rows):
                    continue
                write(out, meta_of(args, ids, image_token, context), rows, argv)
                t0 = time.perf_counter()
                logits, kept = streamed_logits(model, embeds, {"window": w, "sinks": s})
                row = {"cache": "sinks+window" if s else "window only", "window": w, "sinks": s, "kept": kept}
                row.update(perplexities(logits, ids, answer, context))
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(row, flush=True)
    print(write(out, meta_of(args, ids, image_token, context), rows, argv))


def meta_of(args, ids, image_token, context) -> dict:
    return {
        "model": args.model,
        "images": args.turns,
        "questions_per_image": args.questions,
        "stream_tokens": len(ids),
        "image_tokens": int((ids == image_token).sum()),
        "trained_context": context,
        "seed": args.seed,
        "feeding": "one token per forward (StreamingLLM's evaluation); full = one plain forward",
    }


def write(out: Path, meta, rows, argv) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_window.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    text = table(meta, rows, argv)
    (out / "README.md").write_text(text)
    return text


def table(meta, rows, argv) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [
        "# Sink + window KV cache: perplexity on a long multimodal chat",
        "",
        f"`python -m mmsink.evals.kv_window {' '.join(argv or [])}`".replace(" `", "`"),
        "",
        f"{meta['model']}, {meta['images']} images x {meta['questions_per_image']} question/answer turns, "
        f"{meta['stream_tokens']} tokens ({meta['image_tokens']} image tokens), trained context "
        f"{meta['trained_context']}; {meta['feeding']}. "
        "Perplexity over the answer tokens (with `</s>`), all of them and those past the trained context; "
        "answer tokens predicted right (argmax).",
        "",
        "| cache | window | sinks | tokens kept at the end | ppl (answers) | ppl (answers past the context) "
        "| answer tokens right |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cache']} | {r['window'] or '-'} | {r['sinks'] if r['sinks'] is not None else '-'} | "
            f"{r['kept']} | {f(r['ppl_answers'])} | {f(r['ppl_answers_past_context'])} | "
            f"{r['answer_token_acc']:.3f} ({r['n_answer_tokens']}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
