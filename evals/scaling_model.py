"""A compute-bound checkpoint for data-parallel scaling runs (issue: eval scales with GPU count).

    python evals/scaling_model.py --src models/synthllava --out /tmp/big

The shipped reference model is too small to keep a GPU busy (its eval is bound by Python and data
loading), so this writes the reference model's tokenizer, processor and vision tower with a
LLaVA-1.5-7B-shaped language model (random weights, bf16). Its answers are noise; its timings are those
of a 7B model, which is what a scaling run measures.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoProcessor, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="models/synthllava")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    cfg = LlavaConfig.from_pretrained(a.src)
    t = cfg.text_config
    t.num_hidden_layers, t.hidden_size, t.intermediate_size = a.layers, a.hidden, a.intermediate
    t.num_attention_heads = t.num_key_value_heads = a.heads
    t.head_dim = a.hidden // a.heads
    torch.manual_seed(0)
    with torch.device(a.device):
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig.from_pretrained(a.src)
    model.save_pretrained(a.out)
    AutoProcessor.from_pretrained(a.src).save_pretrained(a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {a.out}: {n / 1e9:.2f} B parameters, bf16")


if __name__ == "__main__":
    main()
