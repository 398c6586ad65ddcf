"""``mmsink convert-llava SRC DST``: a checkpoint of the original LLaVA code (haotian-liu/LLaVA,
``LlavaLlamaForCausalLM``, e.g. llava-v1.5-7b) to transformers' ``LlavaForConditionalGeneration`` format
(weights, config, processor), offline. See docs/convert_llava.md.

The weights are checked, names and shapes, against the model built on the meta device before anything is
written, then streamed one stored file at a time (a 7B checkpoint never sits in memory whole).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
# conv_vicuna_v1 of the original repo: the LLaVA-1.5 prompt format
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PROJECTORS = {  # original sub-name -> transformers sub-name
    "mlp2x_gelu": {
        "0.weight": "linear_1.weight",
        "0.bias": "linear_1.bias",
        "2.weight": "linear_2.weight",
        "2.bias": "linear_2.bias",
    },
    "linear": {"weight": "linear_1.weight", "bias": "linear_1.bias"},
}
FEATURES = {"patch": "default", "cls_patch": "full"}
# fields of the original config.json that are not the language model's
LLAVA_FIELDS = {
    "architectures",
    "model_type",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "use_mm_proj",
    "max_length",
}
LLAVA_PREFIXES = ("mm_", "tune_mm", "freeze_mm", "unfreeze_mm")
# the towers the released checkpoints name, for a checkpoint that carries the tower's weights itself
VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(VIT_L14, image_size=336),
    "openai/clip-vit-large-patch14": dict(VIT_L14, image_size=224),
}
# buffers that old transformers versions saved and current ones recompute
DROPPED = ("rotary_emb.inv_freq", "embeddings.position_ids")
EMBEDDINGS = ("embed_tokens.weight", "lm_head.weight")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ConvertError(ValueError):
    """Bad input; the message says what is wrong."""


# ---- checkpoint folders ----


def weight_files(folder: Path) -> dict[str, Path]:
    """{stored name: file} of a checkpoint folder (safetensors preferred, sharded or not)."""
    for index, single in [
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ]:
        if (folder / index).exists():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return {key: folder / file for key, file in weight_map.items()}
        if (folder / single).exists():
            return dict.fromkeys(shapes(folder / single), folder / single)
    raise ConvertError(f"{folder} holds no weights (model.safetensors or pytorch_model.bin, or their index)")


def tensors(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:  # mmap: a 10 GB shard is paged in while it is copied, not read whole first
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the pre-zip serialization cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def shapes(file: Path) -> dict[str, tuple[int, ...]]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in tensors(file).items()}


def read_source_config(src: Path) -> dict:
    """The raw config.json: released checkpoints say model_type "llava", which is transformers' own LLaVA
    type, so AutoConfig would misread them."""
    if not (src / "config.json").exists():
        raise ConvertError(f"{src} has no config.json: give the folder of an original LLaVA checkpoint")
    cfg = json.loads((src / "config.json").read_text())
    arch = cfg.get("architectures") or []
    if "text_config" in cfg or "LlavaForConditionalGeneration" in arch:
        raise ConvertError(f"{src} is in transformers' LLaVA format already; load it with from_pretrained")
    if (src / "adapter_config.json").exists():
        raise ConvertError(f"{src} is a LoRA checkpoint: merge it into its base model first")
    if "mm_vision_tower" not in cfg:
        raise ConvertError(f"{src}/config.json is not an original LLaVA config (no mm_vision_tower)")
    if arch and "LlavaLlamaForCausalLM" not in arch:
        raise ConvertError(f"only LlavaLlamaForCausalLM checkpoints are supported, not {arch}")
    if cfg.get("image_aspect_ratio") == "anyres" or "unpad" in (cfg.get("mm_patch_merge_type") or ""):
        raise ConvertError(
            f"{src} is a LLaVA-NeXT (anyres) checkpoint; only LLaVA-1.5-style ones are supported"
        )
    kind = cfg.get("mm_projector_type", "linear")  # the original code's default
    if kind not in PROJECTORS:
        raise ConvertError(f"mm_projector_type {kind!r} is not supported; supported: {', '.join(PROJECTORS)}")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in FEATURES:
        raise ConvertError(
            f"mm_vision_select_feature {feature!r} is not supported; supported: {list(FEATURES)}"
        )
    return cfg


# ---- the vision tower ----


def vision_tower_dir(cfg: dict, given: str | None) -> Path | None:
    if given:
        if not (Path(given) / "config.json").exists():
            raise ConvertError(f"--vision-tower {given} is not a checkpoint folder (no config.json)")
        return Path(given)
    name = cfg["mm_vision_tower"]  # a local path when the checkpoint was trained from one
    return Path(name) if (Path(name) / "config.json").exists() else None


def vision_config(cfg: dict, tower: Path | None, src_has_tower: bool):
    from transformers import CLIPConfig, CLIPVisionConfig

    name = cfg["mm_vision_tower"]
    if tower is None:
        if not src_has_tower:
            raise ConvertError(
                f"the checkpoint holds no vision-tower weights (the original code loads {name!r} at run "
                "time); pass --vision-tower PATH, a local CLIPVisionModel or CLIPModel folder of that tower"
            )
        if name not in KNOWN_TOWERS:
            raise ConvertError(f"the config of vision tower {name!r} is unknown: pass --vision-tower PATH")
        return CLIPVisionConfig(**KNOWN_TOWERS[name])
    kind = json.loads((tower / "config.json").read_text()).get("model_type")
    if kind == "clip_vision_model":
        return CLIPVisionConfig.from_pretrained(tower)
    if kind == "clip":
        return CLIPConfig.from_pretrained(tower).vision_config
    raise ConvertError(f"vision tower {tower} is a {kind!r} model, not a CLIP (clip, clip_vision_model) one")


def tower_weights(tower: Path) -> dict[str, tuple[Path, str]]:
    """{name inside the tower: (file, stored name)}. CLIPModel and older CLIPVisionModel folders store the
    tower as ``vision_model.*``; CLIPVisionModel folders saved by transformers 5 without the prefix."""
    files = weight_files(tower)
    inner = {
        k.removeprefix("vision_model."): (f, k) for k, f in files.items() if k.startswith("vision_model.")
    }
    return inner or {k: (f, k) for k, f in files.items()}


# ---- names ----


def target_name(key: str, projector: str) -> str | None:
    """transformers' name of an original weight; None for buffers that are not kept."""
    if key.endswith(DROPPED):
        return None
    if key == "lm_head.weight":
        return key
    if key.startswith("model.mm_projector."):
        part = PROJECTORS[projector].get(key.removeprefix("model.mm_projector."))
        if part is None:
            raise ConvertError(f"weight {key} does not belong to a {projector!r} projector")
        return "model.multi_modal_projector." + part
    if key.startswith("model.vision_tower.vision_tower."):  # CLIPVisionTower wraps a CLIPVisionModel
        inner = key.removeprefix("model.vision_tower.vision_tower.")
        return "model.vision_tower." + inner.removeprefix("vision_model.")
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "model.language_model." + key.removeprefix("model.")
    if key == "model.image_newline":
        raise ConvertError(
            "the checkpoint has image_newline (LLaVA-NeXT); only LLaVA-1.5-style ones are supported"
        )
    raise ConvertError(f"unexpected weight {key!r} in the checkpoint")


def plan(src: Path, cfg: dict, tower: Path | None) -> dict[str, tuple[Path, str]]:
    """{transformers name: (file, stored name)}; a tower in SRC (fine-tuned) wins over --vision-tower."""
    projector = cfg.get("mm_projector_type", "linear")
    out = {}
    for key, file in weight_files(src).items():
        name = target_name(key, projector)
        if name is not None:
            out[name] = (file, key)
    if tower is not None and not any(n.startswith("model.vision_tower.") for n in out):
        for name, (file, key) in tower_weights(tower).items():
            if not key.endswith(DROPPED):
                out["model.vision_tower." + name] = (file, key)
    return out


def by_file(mapping: dict) -> dict[Path, dict[str, str]]:
    out: dict[Path, dict[str, str]] = {}
    for name, (file, key) in mapping.items():
        out.setdefault(file, {})[key] = name
    return dict(sorted(out.items()))


def stored_shapes(mapping: dict) -> dict[str, tuple[int, ...]]:
    out = {}
    for file, names in by_file(mapping).items():
        found = shapes(file)
        out |= {name: found[key] for key, name in names.items()}
    return out


# ---- tokenizer, config, processor ----


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def load_tokenizer(src: Path):
    from transformers import LlamaTokenizer

    if not (src / "tokenizer.json").exists():
        if not (src / "tokenizer.model").exists():
            raise ConvertError(f"{src} has no tokenizer (tokenizer.model or tokenizer.json)")
        if not all(installed(m) for m in ("sentencepiece", "google.protobuf")):
            raise ConvertError(f"reading {src}/tokenizer.model needs: pip install sentencepiece protobuf")
    tok = LlamaTokenizer.from_pretrained(src)
    if tok.pad_token is None:  # the original code pads with unk
        tok.pad_token = tok.unk_token
    tok.padding_side = "left"  # for batched generation
    return tok


def chat_template(image: str) -> str:
    """conv_vicuna_v1: "SYSTEM USER: <image>\\nQUESTION ASSISTANT: ANSWER</s>USER: ... ASSISTANT:"; a system
    message replaces the default system prompt."""
    q = json.dumps  # a JSON string is a valid Jinja string literal
    texts = "selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')"
    return (
        "{%- set system = namespace(text=" + q(VICUNA_SYSTEM) + ") -%}"
        "{%- for m in messages if m['role'] == 'system' -%}"
        "{%- set system.text = m['content'] if m['content'] is string else m['content'] | " + texts + " -%}"
        "{%- endfor -%}"
        "{{- system.text + ' ' -}}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{{- 'USER: ' if m['role'] == 'user' else 'ASSISTANT: ' -}}"
        "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}"
        "{%- for c in m['content'] if c['type'] == 'image' -%}{{- " + q(image + "\n") + " -}}{%- endfor -%}"
        "{{- m['content'] | " + texts + " -}}"
        "{%- endif -%}"
        "{{- ' ' if m['role'] == 'user' else '</s>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


def build_config(cfg: dict, vision, vocab: int, image_id: int, dtype: str):
    from transformers import LlamaConfig, LlavaConfig

    text = {k: v for k, v in cfg.items() if k not in LLAVA_FIELDS and not k.startswith(LLAVA_PREFIXES)}
    text |= {"vocab_size": vocab, "dtype": dtype}
    side = vision.image_size // vision.patch_size
    strategy = FEATURES[cfg.get("mm_vision_select_feature", "patch")]
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=LlamaConfig(**text).to_dict(),
        image_token_id=image_id,
        image_seq_length=side * side + (strategy == "full"),  # "full" keeps the class token
        projector_hidden_act="gelu" if cfg.get("mm_projector_type", "linear") == "mlp2x_gelu" else "linear",
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    return config


def build_processor(tokenizer, vision, tower: Path | None, cfg: dict, pad_to_square: bool):
    from transformers import LlavaImageProcessor, LlavaProcessor

    side = vision.image_size
    settings = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    if tower is not None and (tower / "preprocessor_config.json").exists():
        saved = json.loads((tower / "preprocessor_config.json").read_text())
        keep = ("size", "crop_size", "image_mean", "image_std", "resample", "rescale_factor")
        settings |= {k: saved[k] for k in keep if k in saved}
        if isinstance(settings["size"], int):  # old configs store plain ints
            settings["size"] = {"shortest_edge": settings["size"]}
        if isinstance(settings["crop_size"], int):
            settings["crop_size"] = {"height": settings["crop_size"], "width": settings["crop_size"]}
    # LLaVA-1.5 pads to a square in the mean colour, then CLIP's processor resizes and centre-crops (a no-op)
    image_processor = LlavaImageProcessor(do_pad=pad_to_square, do_center_crop=True, **settings)
    image = "<im_start>" + IMAGE_TOKEN + "<im_end>" if cfg.get("mm_use_im_start_end") else IMAGE_TOKEN
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=FEATURES[cfg.get("mm_vision_select_feature", "patch")],
        chat_template=chat_template(image),
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's class token
    )


# ---- the conversion ----


def check(config, stored: dict, made: set[str]):
    """Names and shapes against the model itself: a bad checkpoint fails before anything is written."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(stored) - made)
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ConvertError(
            f"the weights do not fit the model: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    for name, shape in stored.items():
        if name.endswith(EMBEDDINGS):
            shape = (config.text_config.vocab_size, *shape[1:])  # rows are added for the image token
        if shape != expected[name]:
            raise ConvertError(
                f"{name} is stored as {list(stored[name])}, the model needs {list(expected[name])}"
            )


def identity_projector(config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A linear projector becomes linear_1, act "linear", then this identity linear_2: exact, x @ I = x."""
    size = config.text_config.hidden_size
    return {
        "model.multi_modal_projector.linear_2.weight": torch.eye(size, dtype=dtype),
        "model.multi_modal_projector.linear_2.bias": torch.zeros(size, dtype=dtype),
    }


def add_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """New rows (the image token) = mean of the existing rows: a neutral embedding (never read: image
    features replace it) and an average logit in lm_head."""
    if weight.shape[0] >= rows:
        return weight
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def write_weights(dst: Path, mapping: dict, config, dtype: torch.dtype, made: set[str]):
    """One safetensors shard per stored file, so that memory holds one at a time; an index if several."""
    from safetensors.torch import save_file

    groups = by_file(mapping)
    weight_map, total = {}, 0
    for i, (file, names) in enumerate(groups.items()):
        loaded = tensors(file)
        out = {}
        for key, name in names.items():
            t = loaded[key]
            if name.endswith(EMBEDDINGS):
                t = add_rows(t, config.text_config.vocab_size)
            out[name] = t.to(dtype=dtype, copy=True)  # copy: shares no storage with the source
        if i == len(groups) - 1 and made:
            out |= identity_projector(config, dtype)
        shard = (
            f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        )
        save_file(out, str(dst / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(out, shard)
        total += sum(t.numel() * t.element_size() for t in out.values())
        del loaded, out
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_generation_config(src: Path, dst: Path, cfg: dict):
    """Token ids and max_length only: the sampling fields of Vicuna's file are not LLaVA's eval settings."""
    from transformers import GenerationConfig

    path = src / "generation_config.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    values = {
        k: saved.get(k, cfg.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "max_length")
    }
    GenerationConfig(**{k: v for k, v in values.items() if v is not None}).save_pretrained(dst)


def convert(src, dst, vision_tower=None, pad_to_square=None, dtype=None) -> dict:
    src, dst = Path(src), Path(dst)
    cfg = read_source_config(src)
    tower = vision_tower_dir(cfg, vision_tower)
    mapping = plan(src, cfg, tower)
    vision = vision_config(cfg, tower, any(n.startswith("model.vision_tower.") for n in mapping))
    if cfg.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ConvertError(
            f"mm_hidden_size is {cfg['mm_hidden_size']}, the vision tower's hidden_size {vision.hidden_size}"
        )
    stored = stored_shapes(mapping)
    if "model.language_model.embed_tokens.weight" not in stored:
        raise ConvertError(f"{src} has no model.embed_tokens.weight: not a full LLaVA checkpoint")
    rows, hidden = stored["model.language_model.embed_tokens.weight"]
    if hidden != cfg.get("hidden_size"):
        raise ConvertError(
            f"config hidden_size is {cfg.get('hidden_size')}, the embeddings are {hidden} wide"
        )

    tokenizer = load_tokenizer(src)
    if len(tokenizer) > rows:
        raise ConvertError(f"the tokenizer has {len(tokenizer)} tokens, the embeddings only {rows} rows")
    image_id = tokenizer.get_vocab().get(IMAGE_TOKEN, len(tokenizer))
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)  # no-op when it exists already
    dtype = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    vocab = max(rows, image_id + 1)  # a padded vocabulary has the row already, else one row is added
    config = build_config(cfg, vision, vocab, image_id, dtype)
    linear = cfg.get("mm_projector_type", "linear") == "linear"
    made = set(identity_projector(config, DTYPES[dtype])) if linear else set()
    check(config, stored, made)
    if pad_to_square is None:
        pad_to_square = cfg.get("image_aspect_ratio") == "pad"

    dst.mkdir(parents=True, exist_ok=True)
    write_weights(dst, mapping, config, DTYPES[dtype], made)
    config.save_pretrained(dst)
    write_generation_config(src, dst, cfg)
    build_processor(tokenizer, vision, tower, cfg, pad_to_square).save_pretrained(dst)
    return {"image_token_id": image_id, "vocab_size": vocab, "pad_to_square": pad_to_square}


def original_prompt_ids(tokenizer, prompt: str, image_token_id: int, tokens_per_image: int) -> list[int]:
    """The input ids the original code builds (its ``tokenizer_image_token``): the text between images is
    tokenized chunk by chunk (each chunk gets its own leading "▁"), each "<image>" becomes the image tokens.
    The processor tokenizes the prompt whole, so its ids differ right after each image."""
    chunks = [tokenizer(c).input_ids for c in prompt.split(IMAGE_TOKEN)]
    bos = 1 if chunks[0][:1] == [tokenizer.bos_token_id] else 0
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [image_token_id] * tokens_per_image + chunk[bos:]
    return ids


def main(argv=None):
    from .loading import parser as command_parser

    parser = command_parser("convert-llava", __doc__)
    parser.add_argument("src", help="folder of the original checkpoint (config.json, weights, tokenizer)")
    parser.add_argument("dst", help="output folder, in transformers' LLaVA format")
    parser.add_argument("--vision-tower", help="local CLIPVisionModel or CLIPModel folder (SRC has no tower)")
    parser.add_argument(
        "--pad-to-square",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pad images to a square as LLaVA-1.5 does (default: if the config says image_aspect_ratio pad)",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), help="dtype of the weights (default: the checkpoint's)"
    )
    args = parser.parse_args(argv)
    try:
        info = convert(args.src, args.dst, args.vision_tower, args.pad_to_square, args.dtype)
    except ConvertError as e:
        parser.error(str(e))
    print(
        f"wrote {args.dst}: image token id {info['image_token_id']}, vocab {info['vocab_size']}, "
        f"pad to square: {info['pad_to_square']}"
    )
    return 0
