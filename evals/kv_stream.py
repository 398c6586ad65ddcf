"""The KV-cache modes of issue 17 on a long multi-turn multimodal chat: accuracy, not speed.

Two measurements on one model (``--model``; any LLaVA-style checkpoint with a chat template):

- stream: one conversation of ``--images`` synthvqa images, ``--questions`` question / answer turns each
  (an image is shown with its first question), fed one token per forward as StreamingLLM's evaluation
  does; perplexity and argmax accuracy over the answer tokens, all of them and those past the model's
  trained context, and over every text (non-image) token, as StreamingLLM's figure counts every token.
  "full" is the plain model over the whole stream in one forward.
- latest: ``--trials`` chats of N (``--earlier``) image + question + answer turns, then a new image and a
  question about it; each turn is fed as one forward (the history through the mode's cache), the
  last ``--tail`` tokens of the question and the answer one token per forward (decode steps, where
  LFPS attends sparsely after its dense first steps). Right = every answer token (with the end token)
  is the argmax, i.e. greedy decoding would answer exactly the reference.

Modes: the full cache; sink + window and window only (StreamingLLM); KVSink int2 / int4 with the first
4 tokens kept in full precision and without (keep_sinks off); LFPS top-k sparse decoding against dense
(and with mmsink's ``sinks`` option: the first 4 slots always chosen).
``--sink-dims`` (a model's massive-activation channels) adds the "auto" sink detection to the window and
to int2 / int4 (for a model that has sinks; synthllava has none).

    python -m evals.kv_stream --model models/synthllava --out evals/results/kv_stream
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
from mmsink.api import get_handle
from mmsink.kv.sparse import ExactTopkCache, SparseCache

SINKS = 4  # the paper's first tokens


def modes(args) -> dict:
    """Name -> kv settings (None: the plain cache)."""
    dims = [int(d) for d in args.sink_dims.split(",")] if args.sink_dims else None
    out = {"full": None}
    for w in (int(x) for x in args.windows.split(",")):
        out[f"window {w}"] = {"window": w, "sinks": 0}
        out[f"{SINKS} sinks + window {w}"] = {"window": w, "sinks": SINKS}
        if dims:
            out[f"auto sinks + window {w}"] = {"window": w, "sinks": "auto", "sink_dims": dims}
    for q in args.quant.split(","):
        base = {"quant": q, "group_size": args.group}
        out[f"{q} g{args.group}, {SINKS} sinks kept"] = dict(base, sinks=SINKS)
        out[f"{q} g{args.group}, no sink kept"] = dict(base, sinks=SINKS, keep_sinks=False)
        if dims:
            out[f"{q} g{args.group}, auto sinks kept"] = dict(base, sinks="auto", sink_dims=dims)
    for k in (int(x) for x in args.topk.split(",")):
        out[f"lfps top-{k}"] = {"sparse": "lfps", "topk": k}
        out[f"exact top-{k}"] = {"sparse": "lfps", "topk": k, "exact": True}  # the oracle LFPS approximates
        # mmsink's opt-in (not LFPS's rule): each sample's first SINKS slots always chosen, inside top-k
        out[f"lfps top-{k} + {SINKS} sinks"] = {"sparse": "lfps", "topk": k, "sinks": SINKS}
    if args.only:
        keep = tuple(args.only.split(","))
        out = {name: kv for name, kv in out.items() if name.startswith(keep)}
    return out


def build(processor, turns):
    """turns: (image or None, question, answer). The chat's inputs, the token index where each message
    ends (user messages end after the assistant prompt) and the answer-token mask."""
    msgs, images, cuts = [], [], [0]
    for image, question, answer in turns:
        content = [{"type": "text", "text": question}]
        if image is not None:
            content.insert(0, {"type": "image"})
            images.append(image)
        msgs.append({"role": "user", "content": content})
        for prompt in (True, False):
            text = processor.apply_chat_template(msgs, add_generation_prompt=prompt)
            cuts.append(len(processor(images=images or None, text=text)["input_ids"][0]))
            if prompt:
                msgs.append({"role": "assistant", "content": [{"type": "text", "text": str(answer)}]})
    text = processor.apply_chat_template(msgs)
    inputs = processor(images=images or None, text=text, return_tensors="pt")
    ids = inputs["input_ids"][0]
    if cuts[-1] != len(ids):
        raise RuntimeError("kv_stream: the chat's prefixes tokenize differently from the whole chat")
    answer = torch.zeros(len(ids), dtype=torch.bool)
    for a, b in zip(cuts[1::2], cuts[2::2], strict=True):
        answer[a:b] = True
    return inputs, cuts, answer


class _Stop(Exception):
    pass


def embeds_of(model, inputs) -> torch.Tensor:
    """The language model's input embeddings (image features in place); the decoder does not run."""
    seen = {}

    def grab(module, args, kwargs):
        seen["e"] = kwargs["inputs_embeds"]
        raise _Stop

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        hook.remove()
    return seen["e"]


def feed(model, embeds, cuts, kv, recall=None) -> torch.Tensor:
    """Logits [T, V] of the stream fed as the chunks [cuts[i], cuts[i + 1]) through one cache. An LFPS
    mode with ``"exact": True`` runs the exact top-k oracle; ``recall`` (a Recall) traces LFPS's choices."""
    kv = None if kv is None else dict(kv)
    exact = kv is not None and kv.pop("exact", False)
    if kv is not None:
        mmsink.wrap(model, kv=kv)
    try:
        cache, rows = None, []
        if kv is not None and "sparse" in kv:
            kind = ExactTopkCache if exact else SparseCache
            cache = kind(get_handle(model).kv, model.model.language_model.rotary_emb.inv_freq)
            cache.trace = recall
        for a, b in zip(cuts[:-1], cuts[1:]):
            out = model(inputs_embeds=embeds[:, a:b], past_key_values=cache, use_cache=True)
            cache, rows = out.past_key_values, rows + [out.logits[0]]
        return torch.cat(rows)
    finally:
        if kv is not None:
            mmsink.unwrap(model)


def exact_step(entry, topk: int, scaling: float):
    """One sample's LFPS trace entry (layer, q [1, Hq, D], keys [1, Hkv, T, D], chosen slots [1, Hq, k] with
    -1 for none) against exact attention of the same query over all T keys: (dense softmax [Hq, T], the exact
    top-``topk`` slots by score [Hq, topk], LFPS's choice as a mask [Hq, T]); None when T <= ``topk`` (no
    sparse choice to compare). Shared by ``Recall`` and ``evals.lfps_sink``."""
    _, q, keys, slots = entry
    t = keys.shape[2]
    if t <= topk:
        return None
    k = keys[0].float().repeat_interleave(q.shape[1] // keys.shape[1], 0)  # [H, T, D] (GQA)
    s = torch.einsum("hd,htd->ht", q[0].float(), k) * scaling
    got = slots[0]
    chosen = torch.zeros(s.shape[0], t + 1, dtype=torch.bool).scatter(1, torch.where(got >= 0, got, t), True)
    return torch.softmax(s, -1), s.topk(topk, -1).indices, chosen[:, :t]


class Recall:
    """A cache trace (it only needs ``append``) that sums, per layer and head-averaged, over LFPS's sparse
    steps (more keys than top-k): the share of the step's exact top-k (its own query's scores) that LFPS
    chose, and the dense softmax mass on LFPS's choice and on the exact top-k. One sample, no padding;
    steps before / past the trained context apart, and the steps that predict an answer token."""

    def __init__(self, topk: int, scaling: float, context: int, answer: torch.Tensor):
        self.topk, self.scaling, self.context = topk, scaling, context
        self.answer = set(torch.nonzero(answer)[:, 0].tolist())  # a step with t keys predicts token t
        self.sums: dict = {}  # (part, layer) -> [recall, mass chosen, mass exact, steps]

    def append(self, entry) -> None:
        step = exact_step(entry, self.topk, self.scaling)
        if step is None:
            return
        p, exact, chosen = step
        layer, t = entry[0], p.shape[1]
        row = (
            float(chosen.gather(1, exact).float().mean()),
            float((p * chosen).sum(-1).mean()),
            float(p.gather(1, exact).sum(-1).mean()),
        )
        parts = ["past_context" if t > self.context else "before"] + (["answers"] if t in self.answer else [])
        for part in parts:
            acc = self.sums.setdefault((part, layer), [0.0] * 4)
            for i, x in enumerate((*row, 1)):
                acc[i] += x

    def summary(self) -> dict:
        """{part: [{"layer", "recall", "mass_lfps", "mass_exact", "steps"}]} (means over the steps)."""
        out: dict = {}
        for (part, layer), (r, m, e, n) in sorted(self.sums.items()):
            row = {"layer": layer, "recall": r / n, "mass_lfps": m / n, "mass_exact": e / n, "steps": n}
            out.setdefault(part, []).append(row)
        return out


def scores(logits, ids, sel) -> tuple:
    """Summed NLL, tokens predicted right (argmax) and count over the tokens ``sel`` (position >= 1)."""
    logp = torch.log_softmax(logits[:-1].float(), -1)
    nll = -logp.gather(1, ids[1:, None])[:, 0]
    right = logits[:-1].argmax(-1) == ids[1:]
    s = sel[1:]
    return float(nll[s].sum()), int(right[s].sum()), int(s.sum())


def stream_rows(model, processor, args, all_modes, log) -> tuple[dict, list]:
    from .synthvqa import make_questions, make_scenes, render_scene

    scenes = make_scenes("test", args.images, args.seed)
    qs, ans = make_questions(scenes, "test", args.seed, questions_per_scene=args.questions)
    shown, turns = set(), []
    for q, a in zip(qs, ans, strict=True):
        image = None if q["image"] in shown else render_scene(scenes[len(shown)])
        shown.add(q["image"])
        turns.append((image, q["text"], a["answer"]))
    inputs, _, answer = build(processor, turns)
    ids = inputs["input_ids"][0]
    context = model.config.text_config.max_position_embeddings
    late = answer & (torch.arange(len(ids)) >= context)
    text = ids != model.config.image_token_id  # StreamingLLM's figure: every token, not only the answers
    embeds = embeds_of(model, inputs)
    meta = {"tokens": len(ids), "image_tokens": int((~text).sum()), "text_tokens": int(text[1:].sum())}
    meta.update(answer_tokens=int(answer[1:].sum()), answer_tokens_past_context=int(late[1:].sum()))
    rows = []
    for name, kv in all_modes.items():
        t0 = time.perf_counter()
        cuts = [0, len(ids)] if kv is None else list(range(len(ids) + 1))  # full: one plain forward
        lfps = kv is not None and kv.get("sparse") and not kv.get("exact")
        scale = model.config.text_config.head_dim**-0.5
        recall = Recall(kv["topk"], scale, context, answer) if lfps else None
        logits = feed(model, embeds, cuts, kv, recall)
        row = {"mode": name, "kv": kv}
        for key, sel in (("answers", answer), ("past_context", late), ("text", text)):
            nll, right, n = scores(logits, ids, sel)
            row[f"ppl_{key}"] = math.exp(nll / n) if n else None
            row[f"acc_{key}"] = right / n if n else None
        nll = -torch.log_softmax(logits[:-1].float(), -1).gather(1, ids[1:, None])[:, 0]
        row["answer_nll"] = {int(i): round(float(nll[i - 1]), 2) for i in torch.nonzero(answer[1:])[:, 0] + 1}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        if recall is not None:
            row["recall"] = recall.summary()
        rows.append(row)
        log(f"stream {name}: {row}")
    return meta, rows


def latest_rows(model, processor, args, all_modes, log) -> list:
    from .synthvqa import make_questions, make_scenes, render_scene

    rows = []
    for n in (int(x) for x in args.earlier.split(",")):
        scenes = make_scenes("test", args.trials * (n + 1), args.seed + 1000 + n)
        qs, ans = make_questions(scenes, "test", args.seed, questions_per_scene=1)
        stats = {name: [0.0, 0, 0] for name in all_modes}  # summed NLL, right, trials
        tokens = 0
        for t in range(args.trials):
            turns = [
                (render_scene(scenes[i]), qs[i]["text"], ans[i]["answer"])
                for i in range(t * (n + 1), (t + 1) * (n + 1))
            ]
            inputs, cuts, answer = build(processor, turns)
            ids = inputs["input_ids"][0]
            tokens += len(ids)
            last = torch.zeros_like(answer)
            last[cuts[-2] :] = True  # the last answer
            steps = max(cuts[-2] - args.tail, cuts[-3])  # the question's end and the answer: decode steps
            chunks = cuts[:-2] + list(range(steps, cuts[-1] + 1))
            embeds = embeds_of(model, inputs)
            for name, kv in all_modes.items():
                nll, right, k = scores(feed(model, embeds, chunks, kv), ids, last)
                st = stats[name]
                st[0], st[1], st[2] = st[0] + nll / k, st[1] + int(right == k), st[2] + 1
        for name, (nll, right, k) in stats.items():
            row = {"earlier_turns": n, "mode": name, "accuracy": right / k, "answer_nll": nll / k}
            row.update(trials=k, mean_tokens=round(tokens / args.trials))
            rows.append(row)
            log(f"latest after {n} turns, {name}: {row}")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/synthllava")
    p.add_argument("--images", type=int, default=6, help="stream: images, each shown with its first question")
    p.add_argument("--questions", type=int, default=3, help="stream: question / answer turns per image")
    p.add_argument("--earlier", default="0,3,6", help="latest: image turns before the last one")
    p.add_argument("--trials", type=int, default=16, help="latest: chats per number of earlier turns")
    p.add_argument("--tail", type=int, default=12, help="latest: question tokens fed one per forward")
    p.add_argument("--windows", default="256,512")
    p.add_argument("--quant", default="int4,int2")
    p.add_argument("--group", type=int, default=32, help="KVSink group size")
    p.add_argument("--topk", default="64,256", help="LFPS keys per head and step")
    p.add_argument("--sink-dims", default="", help="massive-activation channels: adds 'auto' sink modes")
    p.add_argument("--parts", default="stream,latest")
    p.add_argument("--only", default="", help="mode name prefixes to run; rows merge into --out's JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="evals/results/kv_stream")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    all_modes = modes(args)
    start = time.perf_counter()

    def log(msg):
        print(f"[kv_stream {time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    command = "python -m evals.kv_stream " + " ".join(argv)
    result = {"command": command, "args": vars(args)}
    old = Path(args.out) / "kv_stream.json"
    if args.only and old.exists():  # a partial rerun: its rows replace or join the earlier run's
        result = json.loads(old.read_text())
        result["reruns"] = result.get("reruns", []) + [command]
    result["trained_context"] = model.config.text_config.max_position_embeddings
    with torch.no_grad():
        if "stream" in args.parts:
            meta, rows = stream_rows(model, processor, args, all_modes, log)
            result["stream_meta"], result["stream"] = meta, merge(result.get("stream"), rows, args.only)
            write(Path(args.out), result)
        if "latest" in args.parts:
            rows = latest_rows(model, processor, args, all_modes, log)
            result["latest"] = merge(result.get("latest"), rows, args.only)
    log("wrote " + write(Path(args.out), result))


def merge(old, new: list, only: str) -> list:
    """``new`` rows replace ``old`` ones of the same mode (and N), the others join at the end."""
    if not only or not old:
        return new
    key = lambda x: (x["mode"], x.get("earlier_turns"))  # noqa: E731
    fresh = {key(x): x for x in new}
    out = [fresh.pop(key(x), x) for x in old]
    return out + list(fresh.values())


def write(out: Path, result: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_stream.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "kv_stream.md").write_text(table(result))
    return str(out / "kv_stream.md")


def costly_tokens(rows: list) -> list:
    """The answer tokens that carry each mode's perplexity: position (NLL) of those with NLL > 1."""
    rows = [x for x in rows if "answer_nll" in x]
    if not rows:
        return []
    out = ["**Answer tokens with NLL > 1** (position: NLL; the rest are ~0):", ""]
    out += ["| mode | tokens |", "|---|---|"]
    for x in rows:
        bad = [f"{p}: {v:.1f}" for p, v in x["answer_nll"].items() if v > 1]
        out.append(f"| {x['mode']} | {', '.join(bad) or '-'} |")
    return out + [""]


def recall_table(rows: list) -> list:
    """LFPS's choice against the exact top-k of its own queries, per part: means over layers (range)."""
    rows = [x for x in rows if x.get("recall")]
    if not rows:
        return []
    out = [
        "**LFPS against the exact top-k** of the same step's query (its own run; sparse steps only, i.e. "
        "more keys than top-k): recall = share of the exact top-k that LFPS chose; mass = dense softmax "
        "weight on LFPS's keys / on the exact top-k. Mean over layers (min - max over layers); steps per "
        "layer in brackets.",
        "",
        "| mode | part | recall | mass on LFPS's keys | mass on exact top-k |",
        "|---|---|---|---|---|",
    ]
    for x in rows:
        for part, per in x["recall"].items():
            cells = []
            for key in ("recall", "mass_lfps", "mass_exact"):
                v = [y[key] for y in per]
                cells.append(f"{sum(v) / len(v):.2f} ({min(v):.2f} - {max(v):.2f})")
            out.append(f"| {x['mode']} | {part} [{int(per[0]['steps'])}] | " + " | ".join(cells) + " |")
    return out + [""]


def text_note(meta: dict) -> str:
    if "text_tokens" not in meta:
        return "."
    return f" ({meta['text_tokens']}; '-': a row run before this column existed)."


def table(r: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    a = r["args"]
    lines = ["# KV-cache modes on a long multimodal chat (issue 17)", "", f"`{r['command']}`", ""]
    lines += [f"Rows rerun: `{c}`" for c in r.get("reruns", [])] + ([""] if r.get("reruns") else [])
    if "stream" in r:
        m = r["stream_meta"]
        lines += [
            f"**Stream** ({a['model']}): {a['images']} images x {a['questions']} question / answer turns, "
            f"{m['tokens']} tokens ({m['image_tokens']} image tokens), "
            f"trained context {r['trained_context']}; "
            "one token per forward (full: one plain forward). Perplexity and argmax accuracy over the "
            f"{m['answer_tokens']} answer tokens, and over the {m['answer_tokens_past_context']} past the "
            "trained context; text: every non-image token" + text_note(m),
            "",
            "| mode | ppl (answers) | right (answers) | ppl (past context) | right (past context) "
            "| ppl (text) | right (text) |",
            "|---|---|---|---|---|---|---|",
        ]
        for x in r["stream"]:
            lines.append(
                f"| {x['mode']} | {f(x['ppl_answers'])} | {f(x['acc_answers'])} | "
                f"{f(x['ppl_past_context'])} | {f(x['acc_past_context'])} | "
                f"{f(x.get('ppl_text'))} | {f(x.get('acc_text'))} |"
            )
        lines += [""] + recall_table(r["stream"]) + costly_tokens(r["stream"])
    if "latest" in r:
        ns = sorted({x["earlier_turns"] for x in r["latest"]})
        toks = {x["earlier_turns"]: x["mean_tokens"] for x in r["latest"]}
        lines += [
            f"**Latest image** ({a['model']}): {a['trials']} chats per column; N earlier image + question + "
            "answer turns (each fed as one forward), then a new image and a question about it (its last "
            f"{a['tail']} tokens and the answer fed one token per forward); right = "
            "greedy decoding gives exactly the reference answer (every answer token the argmax). "
            "Mean chat length in tokens: " + ", ".join(f"N={n}: {toks[n]}" for n in ns) + ".",
            "",
            "| mode | " + " | ".join(f"N={n} right (answer NLL)" for n in ns) + " |",
            "|---|" + "---|" * len(ns),
        ]
        by = {(x["mode"], x["earlier_turns"]): x for x in r["latest"]}
        for name in dict.fromkeys(x["mode"] for x in r["latest"]):
            cells = [f"{by[name, n]['accuracy']:.3f} ({by[name, n]['answer_nll']:.2f})" for n in ns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
