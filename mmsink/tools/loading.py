"""One loader for every command that takes a model folder (eval, sweep, demo, inspect, calibrate): the
family is checked from ``config.json`` before anything is built, then transformers' auto class for
image-text models loads it offline; one prompt builder and one image reader."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


class LoadError(ValueError):
    """A model folder, image or data file that cannot be used (the message is one line for the user)."""


def parser(command: str, doc: str):
    """A command's argument parser whose description is its module docstring as written (argparse's
    default formatter would run the example lines together)."""
    import argparse

    return argparse.ArgumentParser(
        prog=f"mmsink {command}",
        description=doc.strip().replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def fail(command: str, message) -> None:
    """The one line a command prints for input it cannot use; exit status 1."""
    print(f"mmsink {command}: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def check_device(device) -> str:
    """``device`` when this machine has it, else a one-line LoadError (before any weights are read)."""
    import torch

    kind = str(device or "cpu").split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"--device {device}: no CUDA device on this machine; use --device cpu")
    if kind == "cuda" and ":" in str(device) and int(str(device).split(":")[1]) >= torch.cuda.device_count():
        raise LoadError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind not in ("cpu", "cuda", "mps", "xpu"):
        raise LoadError(f"--device {device}: expected cpu or cuda (cuda:N)")
    return device


def _writable_dir(folder: Path, what: str) -> None:
    probe = folder
    while not probe.exists():  # the nearest existing parent decides whether the folder can be made
        probe = probe.parent
    if not probe.is_dir():
        raise LoadError(f"{what} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LoadError(f"{what} {folder}: {probe} is not writable")


def check_out_file(path, what="--out") -> Path:
    """An output file that can be written (checked before the model loads)."""
    path = Path(path)
    if path.is_dir():
        raise LoadError(f"{what} {path} is a folder; give a file name, e.g. {path / 'answers.jsonl'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise LoadError(f"{what} {path} is not writable")
    _writable_dir(path.parent if str(path.parent) else Path("."), what)
    return path


def check_out_dir(path, what="--out") -> Path:
    """An output folder that exists or can be made, and can be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LoadError(f"{what} {path} is a file; give a folder")
    _writable_dir(path, what)
    return path


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
    check_device(device)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=getattr(torch, dtype), local_files_only=True
    )
    model = model.to(device).eval()
    processor = load_processor(path, model.config.model_type, AutoProcessor)
    processor.tokenizer.padding_side = "left"
    return model, processor


QWEN_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def load_processor(path, model_type, auto):
    """The folder's processor. Qwen2-VL's loads a video processor that needs torchvision; without it an
    image-only processor (same tokenizer, image processor and chat template) is enough for mmsink."""
    try:
        return auto.from_pretrained(path, local_files_only=True)
    except ImportError as e:
        if model_type not in QWEN_PROCESSORS:
            why = str(e).strip().splitlines()[0]
            raise LoadError(f"cannot load the processor of {path}: {why}") from None
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    base = getattr(transformers, QWEN_PROCESSORS[model_type])

    class ImageOnly(base):
        video_processor = None

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    path = Path(path)
    template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        if (path / name).is_file():
            text = (path / name).read_text(encoding="utf-8")
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    return ImageOnly(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template or getattr(tokenizer, "chat_template", None),
    )


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
