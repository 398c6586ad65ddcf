"""One loader for every command that takes a model folder (eval, sweep, demo, inspect, calibrate): the
family is checked from ``config.json`` before anything is built, then transformers' auto class for
image-text models loads it offline; one prompt builder and one image reader."""

from __future__ import annotations

import json
from pathlib import Path


class LoadError(ValueError):
    """A model folder, image or data file that cannot be used (the message is one line for the user)."""


def check_model_dir(path) -> str:
    """The folder's ``model_type`` when mmsink supports it; otherwise a one-line LoadError."""
    from ..patches import FAMILIES, supported

    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise LoadError(f"no model at {path}: expected a local transformers checkpoint folder (config.json)")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise LoadError(f"unreadable {cfg}: {e}") from None
    if model_type not in FAMILIES:
        raise LoadError(f"{path} holds a {model_type!r} model; mmsink supports {supported()}")
    return model_type


def load_model(path, device="cpu", dtype="float32"):
    """Model and processor from a local folder (offline); left padding for batched generation."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_model_dir(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=getattr(torch, dtype), local_files_only=True
    )
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model, processor


def prompt_for(processor, question: str) -> str:
    """One image and one question in the processor's chat template (LLaVA-1.5's prompt without one)."""
    if getattr(processor, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(msgs, add_generation_prompt=True)
    from mmsink.evals.reference_model import prompt_text

    return prompt_text(question)


def open_image(path: Path):
    """(RGB image, None) or (None, why not)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        return None, f"image file not found: {path}"
    try:
        with Image.open(path) as img:
            return img.convert("RGB"), None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, f"unreadable image {path}: {e}"


def encode(processor, image, question, device):
    enc = processor(images=[image], text=[prompt_for(processor, question)], return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}
