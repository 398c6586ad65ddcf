"""Tiny checkpoints of every family saved with a working processor, as a user's model folder would be."""

from __future__ import annotations

import copy

import torch
from mmsink.evals.reference_model import CHAT_TEMPLATE, build_tokenizer
from tiny import finish, tiny_llava, tiny_llava_next, tiny_qwen

CORPUS = ["What color is the square?", "How many circles are there?", "Is there a red shape?"] * 20
QWEN_SPECIALS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]


def tokenizer(extra=()):
    tok = build_tokenizer(CORPUS, vocab_size=300)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    return tok


def rebuild(model, **config):
    """The same tiny architecture with the tokenizer's vocabulary and special token ids."""
    cfg = copy.deepcopy(model.config)
    for k, v in config.items():
        if k.startswith("text_"):
            setattr(cfg.text_config, k[5:], v)
        else:
            setattr(cfg, k, v)
    torch.manual_seed(0)
    return finish(type(model)(cfg), "sdpa")


def save_llava(path):
    from mmsink.evals.reference_model import build_processor

    tok = tokenizer()
    img = tok.convert_tokens_to_ids("<image>")
    model = rebuild(
        tiny_llava(layers=2), image_token_id=img, text_vocab_size=len(tok), text_pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(path)
    build_processor(tok, image_size=84).save_pretrained(path)
    return path


def save_llava_next(path):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    tok = tokenizer()
    img = tok.convert_tokens_to_ids("<image>")
    base = tiny_llava_next(layers=2)
    model = rebuild(base, image_token_id=img, text_vocab_size=len(tok), text_pad_token_id=tok.pad_token_id)
    ip = LlavaNextImageProcessor(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=base.config.image_grid_pinpoints,
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def save_qwen(path, kind="qwen2_vl"):
    import json
    from pathlib import Path

    from transformers import Qwen2VLImageProcessorPil

    tok = tokenizer(QWEN_SPECIALS)
    ids = dict(
        zip(
            ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
            tok.convert_tokens_to_ids(QWEN_SPECIALS),
        )
    )
    model = rebuild(
        tiny_qwen(kind, layers=2),
        **ids,
        text_vocab_size=len(tok),
        text_pad_token_id=tok.pad_token_id,
        text_bos_token_id=tok.bos_token_id,
        text_eos_token_id=tok.eos_token_id,
    )
    ip = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    template = CHAT_TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    # what Qwen's checkpoints hold; the processor is assembled on loading (its video part needs torchvision)
    tok.image_token = "<|image_pad|>"  # Qwen's placeholder (the reference tokenizer's is <image>)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ip.save_pretrained(path)
    cls = "Qwen2VLProcessor" if kind == "qwen2_vl" else "Qwen2_5_VLProcessor"
    (Path(path) / "processor_config.json").write_text(json.dumps({"processor_class": cls}))
    (Path(path) / "chat_template.jinja").write_text(template)
    return path


SAVERS = {"llava": save_llava, "llava_next": save_llava_next, "qwen2_vl": save_qwen}
