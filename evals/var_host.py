"""VAR's host time per layer of a prefill, on a CPU (issue 20: VAR's batch-1 prefill is host-bound).

    python evals/var_host.py --out evals/results/var_ops/host.json
    PYTHONPATH=/tmp/old python evals/var_host.py --out ...      # an older tree's mmsink, the same model

A LLaVA-1.5-shaped model as small as it gets (32 layers of width 64, a 2-layer CLIP at 28 px: 4 visual
tokens, 5 + 9 text tokens; ``--image 84 --text 35,29``: 36 visual and the bench's text tokens), so that a
prefill's time is mostly the host's (Python, dispatch, compiled calls' guards and wrappers), not
arithmetic. One prefill (``model(...)``, as the bench times it) unwrapped and with VAR (layers 2 .. 30),
eager and compiled (``VARConfig(compile=True)``, the CUDA default, here on the CPU's C++ kernels), taken
in turn round by round; the thread's CPU time of each (other jobs on a shared machine do not count; one
torch thread), least of all runs. Per VAR layer: (VAR - unwrapped) / VAR layers. The CPU still computes
every kernel in that time, which a GPU runs on the device, and a CPU op costs its host less than a GPU
launch: a proxy of the host's share, for comparing two versions on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

import mmsink
from mmsink.sinks.var import VARConfig
from mmsink.tools.bench import IMAGE_TOKEN, environment


def build_small(layers: int = 32, image: int = 28):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image, patch_size=14, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        vocab_size=32064, max_position_embeddings=2048, pad_token_id=0,
    )  # fmt: skip
    n_vis = (image // 14) ** 2
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=n_vis
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation("sdpa")
    return model.eval()


def inputs_for(batch: int, image: int = 28, n_sys: int = 5, n_text: int = 9):
    g = torch.Generator().manual_seed(0)
    sys_ids = torch.randint(3, 30000, (n_sys,), generator=g)
    txt = torch.randint(3, 30000, (n_text,), generator=g)
    vis = torch.full(((image // 14) ** 2,), IMAGE_TOKEN)
    ids = torch.cat([torch.tensor([1]), sys_ids, vis, txt])[None].repeat(batch, 1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, image, image, generator=g),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--image", type=int, default=28, help="image side in pixels (a multiple of 14)")
    ap.add_argument("--text", default="5,9", help="text tokens before and after the image")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of the three states in turn")
    ap.add_argument("--runs", type=int, default=10, help="timed prefills per state and round")
    ap.add_argument("--out", default=None, help="JSON here, the table as .md beside it")
    ap.add_argument("--machine", default="", help="what the machine was (e.g. shared), written with --out")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.runs < 1:
        raise SystemExit("var_host: --rounds and --runs must be >= 1")
    if a.image < 14 or a.image % 14:
        raise SystemExit(f"var_host: --image must be a positive multiple of 14, got {a.image}")
    n_sys, n_text = (int(x) for x in a.text.split(","))
    torch.set_num_threads(1)
    model = build_small(image=a.image)
    inputs = inputs_for(a.batch, a.image, n_sys, n_text)
    hidden, layers = 64, 32
    var = {"sink_dims": tuple(d % hidden for d in (1415, 2533)), "tau": 1.0}
    n_var = sum(VARConfig(**var).active(i, layers) for i in range(layers))
    states = {
        "unwrapped": None,
        "var_eager": {**var, "compile": False},
        "var_compiled": {**var, "compile": True},
    }

    def prefill():
        with torch.no_grad():
            model(**inputs, logits_to_keep=1, use_cache=True)

    times = {k: [] for k in states}
    for _ in range(a.rounds):
        for name, cfg in states.items():
            if cfg is not None:
                mmsink.wrap(model, prune=None, var=cfg)
            try:
                prefill()
                prefill()  # (the first compiled call compiles)
                for _ in range(a.runs):
                    t = time.thread_time()
                    prefill()
                    times[name].append(time.thread_time() - t)
            finally:
                if cfg is not None:
                    mmsink.unwrap(model)
    best = {k: min(v) * 1e3 for k, v in times.items()}
    per = {k: (best[k] - best["unwrapped"]) / n_var * 1e3 for k in states if k != "unwrapped"}
    table = [
        "| batch | unwrapped ms | VAR eager ms | VAR compiled ms | per VAR layer, eager (us) | "
        "per VAR layer, compiled (us) |",
        "|---|---|---|---|---|---|",
        f"| {a.batch} | {best['unwrapped']:.2f} | {best['var_eager']:.2f} | {best['var_compiled']:.2f} | "
        f"{per['var_eager']:.0f} | {per['var_compiled']:.0f} |",
    ]
    print(*table, sep="\n")
    if a.out:
        command = "python evals/var_host.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        env = {
            **environment(),
            "cores": os.cpu_count(),
            "note": a.machine,
            "var": var,
            "mmsink": mmsink.__file__,
        }
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        res = {
            "command": command,
            "environment": env,
            "var_layers": n_var,
            "best_ms": best,
            "per_layer_us": per,
        }
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        with open(a.out.removesuffix(".json") + ".md", "w") as f:
            f.write(f"# VAR host time per layer (issue 20)\n\n    {command}\n\n{json.dumps(env)}\n\n")
            f.write("\n".join(table) + "\n")
    return best, per


if __name__ == "__main__":
    main()
