"""Pre-train the language model of ``models/synthllava-sinks`` on the registry-package English corpus
(``evals/corpus.py``) with an ordinary LLM recipe, and measure during training whether attention sinks
and massive activations emerge.

Recipe: ``LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU, tied embeddings), every training window starts
with ``<s>`` (packed documents separated by ``</s>`` after it), AdamW (betas 0.9 / 0.95, weight decay on
matrices), linear warmup then cosine decay, gradient clipping, bf16 autocast on GPU, seeded. Nothing in
the loss looks at activations, norms or attention.

Measured every ``--eval-every`` steps on fixed held-out windows (eager attention for that forward only):
  - ``first_attn[l]``: attention that queries at positions >= ``--probe-offset`` give to position 0,
    mean over heads, queries and windows, per layer;
  - ``sink_rate``: share of (layer, head) pairs whose such mean exceeds 0.3 (Gu et al.'s threshold);
  - ``max_ratio[l]``: max over tokens and channels of |h_d| / RMS(h) of the residual stream after layer l
    (VAR's phi over all channels), with the token position and channel where it occurs, the same at
    position 0 and over positions > 0, and Sun et al.'s max |h| and median |h|;
  - ``v0_ratio[l]``: norm of position 0's value vectors over the mean norm of the others (value drain).

Resuming: ``--init DIR`` loads the weights of a checkpoint this script saved; the optimizer state is
not in it (it is twice the model and would not fit the size limits), so AdamW restarts and the run uses
its own warmup (``--warmup``, a few hundred steps) and decay. ``training.json`` keeps the earlier runs'
records under ``previous``. ``--state FILE`` also writes the whole state (fp32 weights, AdamW, step, data
RNG) at every probe; ``--resume FILE`` continues that run exactly (same schedule and data order), e.g. in
a second call on a machine still warm, where an ignored folder survives between calls.

    python -m evals.train_sinks --corpus .corpus --out OUT_DIR --time-budget 450
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .corpus import BOS, SPECIALS, load_corpus

SINK_EPS = 0.3


def build_model(
    vocab: int,
    layers: int,
    hidden: int,
    heads: int,
    ffn: int,
    max_pos: int,
    kv_heads: int = 0,
    rope_theta: float = 10000.0,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=2,
        pad_token_id=3,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def windows(ids: torch.Tensor, starts: torch.Tensor, ctx: int) -> torch.Tensor:
    """[len(starts), ctx] windows: <s> then ctx - 1 tokens of the stream from each start."""
    idx = starts[:, None] + torch.arange(ctx - 1, device=ids.device)
    x = ids[idx]
    return torch.cat([torch.full_like(x[:, :1], BOS), x], 1)


def fixed_windows(ids: torch.Tensor, n: int, ctx: int) -> torch.Tensor:
    """n evenly spaced windows of the validation stream (the same every time)."""
    n = max(1, min(n, (ids.numel() - 1) // (ctx - 1)))
    span = ids.numel() - (ctx - 1)
    starts = torch.linspace(0, span - 1, n).long().to(ids.device)
    return windows(ids, starts, ctx)


@torch.no_grad()
def measure(model, x: torch.Tensor, offset: int, eps: float = SINK_EPS) -> dict:
    """Attention-sink and massive-activation statistics of ``model`` on the windows ``x`` [B, T]."""
    layers = model.model.layers
    hidden, values = [], []
    hooks = [
        layer.register_forward_hook(
            lambda m, i, o: hidden.append((o[0] if isinstance(o, tuple) else o).float())
        )
        for layer in layers
    ]
    hooks += [
        layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: values.append(o.float()))
        for layer in layers
    ]
    impl = model.config._attn_implementation
    was_training = model.training
    model.eval()
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=x, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(impl)
        for h in hooks:
            h.remove()
        model.train(was_training)
    heads = model.config.num_attention_heads
    per_head = torch.stack([a.float()[:, :, offset:, 0].mean((0, 2)) for a in out.attentions])  # [L, H]
    res = {
        "first_attn": [round(v, 4) for v in per_head.mean(1).tolist()],
        "sink_rate": round(float((per_head > eps).float().mean()), 4),
        "sink_heads": [int(v) for v in (per_head > eps).sum(1).tolist()],
        "heads": heads,
    }
    rows = []
    for h in hidden:
        rms = h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        r = h.abs() / rms  # [B, T, D]
        flat = int(r.argmax())
        b, t, d = np.unravel_index(flat, r.shape)
        rows.append(
            {
                "max": round(float(r.max()), 2),
                "pos": int(t),
                "chan": int(d),
                "max_pos0": round(float(r[:, 0].max()), 2),
                "max_rest": round(float(r[:, 1:].max()), 2) if r.shape[1] > 1 else 0.0,
                "abs_max": round(float(h.abs().max()), 2),
                "abs_median": round(float(h.abs().median()), 4),
            }
        )
    res["max_ratio"] = [row["max"] for row in rows]
    res["hidden"] = rows
    v0 = []
    for v in values:
        n = v.norm(dim=-1)  # [B, T] over all heads together
        v0.append(round(float(n[:, 0].mean() / n[:, 1:].mean()), 3) if n.shape[1] > 1 else 1.0)
    res["v0_ratio"] = v0
    return res


@torch.no_grad()
def val_loss(model, x: torch.Tensor, batch: int, autocast) -> float:
    model.eval()
    tot = 0.0
    for i in range(0, x.shape[0], batch):
        with autocast():
            tot += (
                float(model(input_ids=x[i : i + batch], labels=x[i : i + batch]).loss)
                * x[i : i + batch].shape[0]
            )
    model.train()
    return tot / x.shape[0]


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def save_checkpoint(model, out: Path, record: dict, shard: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out, max_shard_size=shard)
    (out / "training.json").write_text(json.dumps(record, indent=1))


def save_tokenizer(corpus: Path, out: Path, ctx: int) -> None:
    """The corpus tokenizer as a transformers tokenizer next to the weights (<s> prepended)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(Path(corpus) / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": SPECIALS[4]},
        model_max_length=ctx,
    )
    fast.save_pretrained(out)


def probe_checkpoint(a, val: torch.Tensor) -> dict:
    """Phenomena of a saved checkpoint at several query offsets and window lengths: attention to the
    first token falls with distance in these small models, so one setting alone misleads."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(a.init, dtype=torch.float32, attn_implementation="sdpa")
    model.to(a.device).eval()
    rows = []
    for spec in a.probe_only.split(","):
        offset, length, n = (int(v) for v in spec.split(":"))
        m = measure(model, fixed_windows(val, n, length), offset)
        rows.append({"offset": offset, "len": length, "windows": n} | m)
        print(json.dumps({k: rows[-1][k] for k in ("offset", "len", "first_attn", "sink_rate", "max_ratio")}))
    rec = {"checkpoint": str(a.init), "corpus": str(a.corpus), "probes": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1))
    return rec


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=".corpus")
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", default=None, help="checkpoint folder to continue from (weights only)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=320)
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--ffn", type=int, default=832)
    ap.add_argument(
        "--rope-theta", type=float, default=10000.0, help="RoPE base (Llama 2: 1e4, Llama 3: 5e5)"
    )
    ap.add_argument("--kv-heads", type=int, default=0, help="grouped-query attention (0: as many as --heads)")
    ap.add_argument("--max-pos", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument(
        "--steps", type=int, default=4000, help="schedule length (an upper bound with --time-budget)"
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        help="seconds; after 30 steps the schedule is shortened to fit (the resolved length is logged)",
    )
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=0.1, help="final lr as a fraction of the peak")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-windows", type=int, default=64)
    ap.add_argument("--probe-windows", type=int, default=16)
    ap.add_argument("--probe-len", type=int, default=512)
    ap.add_argument("--probe-offset", type=int, default=16)
    ap.add_argument("--shard", default="15MB")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-save", action="store_true", help="record training.json only, no weights")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    ap.add_argument(
        "--state",
        default="",
        help="also save the whole training state here (fp32 weights, AdamW, step, RNG) at every probe, for "
        "--resume; too large to commit or carry, it lives on the training machine's disk",
    )
    ap.add_argument(
        "--resume",
        default="",
        help="continue exactly from a --state file: same schedule, optimizer and data order; "
        "--time-budget then only stops the run early (the schedule is not shortened)",
    )
    ap.add_argument(
        "--probe-only",
        default="",
        help="no training: probe the --init checkpoint at OFFSET:LEN:WINDOWS settings (comma-separated), "
        "write the results to --out as JSON",
    )
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    t0 = time.time()
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tok, train_ids, val_ids, meta = load_corpus(Path(a.corpus))
    train = torch.from_numpy(train_ids).to(dev)
    val = torch.from_numpy(val_ids).to(dev)
    vocab = tok.get_vocab_size()
    if a.probe_only:
        return probe_checkpoint(a, val)

    from transformers import LlamaForCausalLM

    previous = []
    if a.init:
        model = LlamaForCausalLM.from_pretrained(a.init, dtype=torch.float32, attn_implementation="sdpa")
        prev = Path(a.init) / "training.json"
        if prev.exists():
            p = json.loads(prev.read_text())
            previous = p.get("previous", []) + [{k: v for k, v in p.items() if k != "previous"}]
    else:
        model = build_model(vocab, a.layers, a.hidden, a.heads, a.ffn, a.max_pos, a.kv_heads, a.rope_theta)
    resume = torch.load(a.resume, map_location="cpu", weights_only=False) if a.resume else None
    if resume:
        model.load_state_dict(resume["model"])
    model.to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    step0 = previous[-1]["global_step"] if previous else 0

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, a.beta2),
        eps=1e-8,
        fused=cuda,
    )
    from contextlib import nullcontext

    # the probes and validation run the plain module (the probe switches to eager attention)
    step_model = torch.compile(model) if a.compile else model

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    vx = fixed_windows(val, a.val_windows, a.ctx)
    px = fixed_windows(val, a.probe_windows, a.probe_len)
    gen = torch.Generator(device="cpu").manual_seed(a.seed + 1)
    out = Path(a.out)
    record = {
        "command": "python -m evals.train_sinks " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(a),
        "params": n_params,
        "corpus": {k: meta[k] for k in ("train", "val", "vocab_size", "chars_per_token")},
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "tokens_per_step": a.batch * a.ctx,
        "step0": step0,
        "curve": [],
        "probes": [],
        "previous": previous,
    }

    def probe(step):
        t = time.time()
        m = measure(model, px, a.probe_offset)
        m.update(
            step=step0 + step,
            val_loss=round(val_loss(model, vx, a.batch // 2 or 1, autocast), 4),
            s=round(time.time() - t0, 1),
            probe_s=round(time.time() - t, 2),
        )
        record["probes"].append(m)
        print(
            json.dumps(
                {
                    k: m[k]
                    for k in ("step", "val_loss", "first_attn", "sink_rate", "max_ratio", "v0_ratio", "s")
                }
            ),
            flush=True,
        )

    total = a.steps
    step, tstart, losses = 0, None, []
    if resume:
        opt.load_state_dict(resume["opt"])
        gen.set_state(resume["gen"])
        step, total = resume["step"], resume["total"]
        record["curve"], record["probes"] = resume["record"]["curve"], resume["record"]["probes"]
        record["resumed_at"] = record.get("resumed_at", []) + [step]
        record["resolved_steps"] = total
        t0 -= resume["record"].get("wall_s", 0.0)  # wall_s and "s" keep counting across calls
    else:
        probe(0)
    # with --state / --resume the schedule is fixed by --steps and the budget only stops this call
    keep = bool(a.state or a.resume)
    budget_end = time.time() + a.time_budget if a.time_budget > 0 else None
    stop = False

    def save_state():
        if a.state:
            sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            st = {"model": sd, "opt": opt.state_dict(), "gen": gen.get_state(), "step": step, "total": total}
            Path(a.state).parent.mkdir(parents=True, exist_ok=True)
            torch.save(st | {"record": record}, a.state)

    while step < total:
        if step == 5:
            if cuda:
                torch.cuda.synchronize()
            tstart = time.time()
        if step == 30 and a.time_budget > 0 and not keep:
            if cuda:
                torch.cuda.synchronize()
            per = (time.time() - tstart) / 25
            per_probe = record["probes"][0]["probe_s"]
            left = a.time_budget - (time.time() - t0)
            fit = int(left / (per * (1 + per_probe / (per * a.eval_every)) * 1.03))
            total = min(total, step + max(0, fit))
            record["resolved_steps"] = total
            record["step_s"] = round(per, 4)
            print(f"step time {per * 1000:.1f} ms -> {total} steps", flush=True)
        lr = lr_at(step, total, a.warmup, a.lr, a.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train.numel() - a.ctx, (a.batch,), generator=gen).to(dev)
        x = windows(train, starts, a.ctx)
        with autocast():
            loss = step_model(input_ids=x, labels=x).loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.detach())
        # hard stop if the early step-time estimate was off (e.g. a GPU shared with another run)
        if keep:
            stop = budget_end is not None and time.time() > budget_end and step % 10 == 0
            if stop:
                record["paused_at"] = step0 + step
        elif a.time_budget > 0 and time.time() - t0 > a.time_budget * 1.08 and step % 10 == 0:
            record["stopped_early_at"] = step0 + step
            total = step
        if step % a.eval_every == 0 or step == total or stop:
            lv = float(torch.stack(losses).mean())
            losses = []
            record["curve"].append(
                {
                    "step": step0 + step,
                    "loss": round(lv, 4),
                    "lr": lr,
                    "grad_norm": round(float(gn), 3),
                    "s": round(time.time() - t0, 1),
                }
            )
            if not math.isfinite(lv):
                print("loss is not finite; stopping", flush=True)
                break
            probe(step)
            record["global_step"] = step0 + step
            record["tokens"] = (previous[-1].get("tokens", 0) if previous else 0) + step * a.batch * a.ctx
            record["wall_s"] = round(time.time() - t0, 1)
            if a.no_save:
                out.mkdir(parents=True, exist_ok=True)
                (out / "training.json").write_text(json.dumps(record, indent=1))
            else:
                save_checkpoint(model, out, record, a.shard)
            save_state()
        if stop:
            break
    return record


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
