"""``mmsink convert-llava``: a tiny checkpoint written in the original LLaVA layout (haotian-liu/LLaVA:
LlavaLlamaForCausalLM key names, config.json fields, sharded pytorch_model-*.bin, sentencepiece tokenizer),
converted and loaded back with from_pretrained: every weight equals the tensor it came from and the logits
equal those of the model it was written from.

The original layout is written here from its documented format, not by the converter's code."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mmsink.tools import cli
from mmsink.tools.convert_llava import VICUNA_SYSTEM, ConvertError, convert, installed, original_prompt_ids

SIDE = 6  # 6x6 patches of 14 pixels: 36 image tokens
LINES = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is shown in the image? ASSISTANT: A red square on a white table.",
    "Describe the picture in detail. There are two cats, one dog and 3 birds.",
]
HAS_SPM = installed("sentencepiece") and installed("google.protobuf")


def write_tokenizer(folder):
    """Llama's tokenizer files: a sentencepiece BPE model with byte fallback (256 byte pieces, so ~300
    pieces) and unk/bos/eos = 0/1/2, plus tokenizer_config.json. Without the sentencepiece package, the
    same kind of tokenizer built with `tokenizers` and saved as tokenizer.json."""
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
    config |= {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
    config |= {"legacy": False, "model_max_length": 2048, "padding_side": "right"}
    if HAS_SPM:
        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(LINES * 20),
            model_writer=model,
            vocab_size=300,
            model_type="bpe",
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        (folder / "tokenizer.model").write_bytes(model.getvalue())
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        return
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        LINES * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    )
    spec = json.loads(tok.to_str())["model"]
    vocab = dict(spec["vocab"])
    for piece in bytes_:
        vocab.setdefault(piece, len(vocab))
    LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in spec["merges"]]).save_pretrained(folder)


def tiny_llava(vocab: int, projector_act: str = "gelu", seed: int = 0):
    """The model the original checkpoint is written from; its extra last row is the image token."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=14 * SIDE,
        patch_size=14,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab + 1,
        max_position_embeddings=512,
        pad_token_id=0,
        rms_norm_eps=1e-5,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=vocab,
        image_seq_length=SIDE * SIDE,
        projector_hidden_act=projector_act,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def original_config(model, vocab: int, **changes) -> dict:
    """config.json as the released llava-v1.5 checkpoints have it (model_type "llava", transformers 4.31)."""
    text, vision = model.config.text_config, model.config.vision_config
    cfg = {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_length": 4096,
        "max_position_embeddings": 512,
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "model_type": "llava",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": vocab,
    }
    return cfg | changes


def original_weights(model, vocab: int, projector: str = "mlp2x_gelu") -> dict[str, torch.Tensor]:
    """State dict under LlavaLlamaForCausalLM's names; the image-token row is not in the original."""
    lm = model.model.language_model
    out = {"model." + k: v.clone() for k, v in lm.state_dict().items()}
    out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"][:vocab].clone()
    out["lm_head.weight"] = model.lm_head.weight[:vocab].clone()
    proj = model.model.multi_modal_projector
    if projector == "mlp2x_gelu":
        for i, part in ((0, proj.linear_1), (2, proj.linear_2)):
            out[f"model.mm_projector.{i}.weight"] = part.weight.clone()
            out[f"model.mm_projector.{i}.bias"] = part.bias.clone()
    else:
        out["model.mm_projector.weight"] = proj.linear_1.weight.clone()
        out["model.mm_projector.bias"] = proj.linear_1.bias.clone()
    # transformers 4.31 saved this buffer; the released checkpoints carry it
    out["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    return out


def transformers_name(key: str) -> str:
    """The documented mapping, written here independently of the converter."""
    if key.startswith("model.mm_projector."):
        index, kind = key.split(".")[2:]
        return f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{kind}"
    return key if key == "lm_head.weight" else "model.language_model." + key.removeprefix("model.")


def write_bin_shards(folder, weights: dict, shards: int = 2):
    names = list(weights)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: weights[k] for k in names[i::shards]}
        torch.save(part, folder / file)
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def write_tower(folder, model, as_clip_model: bool = False):
    """The --vision-tower folder: a CLIPVisionModel (or a whole CLIPModel) with CLIP's preprocessor."""
    vision = model.config.vision_config
    if as_clip_model:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
        clip = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text, projection_dim=32))
        clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    else:
        clip = CLIPVisionModel(vision)
        clip.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(folder)
    size = vision.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    return folder


def source(tmp_path, tokenizer_dir, name="src"):
    folder = tmp_path / name
    folder.mkdir()
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    vocab = len(LlamaTokenizer.from_pretrained(folder))
    return folder, vocab


def image_inputs(model, vocab: int, seed: int = 0):
    """Text, 36 image tokens (id = vocab, the converted model's image token too), text."""
    g = torch.Generator().manual_seed(seed)
    ids = [1] + torch.randint(3, vocab, (7,), generator=g).tolist() + [vocab] * SIDE * SIDE
    ids += torch.randint(3, vocab, (5,), generator=g).tolist()
    pixels = torch.randn(1, 3, 14 * SIDE, 14 * SIDE, generator=g)
    return torch.tensor([ids]), pixels


def logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def test_convert_sharded_bin(tmp_path, tokenizer_dir):
    src, vocab = source(tmp_path, tokenizer_dir)
    ref = tiny_llava(vocab)
    weights = original_weights(ref, vocab)
    write_bin_shards(src, weights)
    (src / "config.json").write_text(json.dumps(original_config(ref, vocab)))
    (src / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    )
    write_tower(tmp_path / "clip", ref)

    assert (
        cli.main(["convert-llava", str(src), str(tmp_path / "dst"), "--vision-tower", str(tmp_path / "clip")])
        == 0
    )
    out = LlavaForConditionalGeneration.from_pretrained(tmp_path / "dst").eval()

    # every weight is the tensor it came from
    got = out.state_dict()
    expect = {transformers_name(k): v for k, v in weights.items() if not k.endswith("inv_freq")}
    expect |= {"model.vision_tower." + k: v for k, v in ref.model.vision_tower.state_dict().items()}
    assert set(got) == set(expect)
    for name, tensor in expect.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert got[name].shape[0] == vocab + 1
            torch.testing.assert_close(got[name][vocab], tensor.mean(0))  # the added image-token row
            assert torch.equal(got[name][:vocab], tensor), name
        else:
            assert torch.equal(got[name], tensor), name

    # end to end: the same logits as the model the checkpoint was written from
    cfg = out.config
    assert (cfg.image_token_id, cfg.image_seq_length, cfg.vision_feature_layer) == (vocab, SIDE * SIDE, -2)
    assert cfg.vision_feature_select_strategy == "default" and cfg.projector_hidden_act == "gelu"
    ids, pixels = image_inputs(ref, vocab)
    torch.testing.assert_close(logits(out, ids, pixels)[..., :vocab], logits(ref, ids, pixels)[..., :vocab])

    # the processor: LLaVA-1.5 prompt, 36 image tokens per image, pads to a square (image_aspect_ratio "pad")
    processor = AutoProcessor.from_pretrained(tmp_path / "dst")
    assert processor.image_processor.do_pad
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == VICUNA_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT:"
    from PIL import Image

    image = Image.new("RGB", (120, 60), (200, 10, 10))
    enc = processor(images=image, text=prompt, return_tensors="pt")
    assert enc["pixel_values"].shape == (1, 3, 14 * SIDE, 14 * SIDE)
    assert (enc["input_ids"] == vocab).sum() == SIDE * SIDE
    # the original code tokenizes the text after the image on its own: the same ids plus one "▁" there
    ids = original_prompt_ids(processor.tokenizer, prompt, vocab, SIDE * SIDE)
    after = ids.index(vocab) + SIDE * SIDE
    assert processor.tokenizer.convert_ids_to_tokens(ids[after]) == "▁"
    assert ids[:after] + ids[after + 1 :] == enc["input_ids"][0].tolist()
    text = "USER: Describe the picture in detail. ASSISTANT:"
    if HAS_SPM:  # same ids as sentencepiece itself
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
        assert processor.tokenizer(text).input_ids == [1] + sp.encode(text)
    logits(out, enc["input_ids"], enc["pixel_values"])  # runs


def test_linear_projector_clip_model_tower(tmp_path, tokenizer_dir):
    """A "linear" projector (LLaVA v1) becomes linear_1 + identity; the tower comes from a CLIPModel folder;
    the weights from one safetensors file; center crop when asked."""
    from safetensors.torch import save_file

    src, vocab = source(tmp_path, tokenizer_dir)
    ref = tiny_llava(vocab, projector_act="linear", seed=1)
    with torch.no_grad():  # the reference model's linear_2 is the identity, as the conversion makes it
        ref.model.multi_modal_projector.linear_2.weight.copy_(torch.eye(64))
        ref.model.multi_modal_projector.linear_2.bias.zero_()
    weights = original_weights(ref, vocab, "linear")
    save_file(weights, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(original_config(ref, vocab, mm_projector_type="linear")))
    write_tower(tmp_path / "clip", ref, as_clip_model=True)

    convert(src, tmp_path / "dst", vision_tower=tmp_path / "clip", pad_to_square=False)
    out = LlavaForConditionalGeneration.from_pretrained(tmp_path / "dst").eval()
    assert out.config.projector_hidden_act == "linear"
    x = torch.randn(3, 32)
    with torch.no_grad():
        projected = out.model.multi_modal_projector(x)
    torch.testing.assert_close(
        projected, x @ weights["model.mm_projector.weight"].T + weights["model.mm_projector.bias"]
    )
    ids, pixels = image_inputs(ref, vocab, seed=1)
    torch.testing.assert_close(logits(out, ids, pixels)[..., :vocab], logits(ref, ids, pixels)[..., :vocab])
    assert not AutoProcessor.from_pretrained(tmp_path / "dst").image_processor.do_pad


def test_tower_in_checkpoint(tmp_path, tokenizer_dir):
    """A checkpoint that carries its (fine-tuned) tower: those weights win over the tower folder, which is
    found through mm_vision_tower when it is a local path."""
    src, vocab = source(tmp_path, tokenizer_dir)
    ref = tiny_llava(vocab, seed=2)
    write_tower(tmp_path / "clip", ref)
    with torch.no_grad():
        for p in ref.model.vision_tower.parameters():
            p.add_(0.01)
    weights = original_weights(ref, vocab)
    tower = ref.model.vision_tower.state_dict()
    weights |= {"model.vision_tower.vision_tower.vision_model." + k: v.clone() for k, v in tower.items()}
    write_bin_shards(src, weights, shards=1)
    (src / "config.json").write_text(
        json.dumps(original_config(ref, vocab, mm_vision_tower=str(tmp_path / "clip")))
    )

    convert(src, tmp_path / "dst")
    out = LlavaForConditionalGeneration.from_pretrained(tmp_path / "dst").eval()
    for name, tensor in tower.items():
        assert torch.equal(out.model.vision_tower.state_dict()[name], tensor), name
    ids, pixels = image_inputs(ref, vocab, seed=2)
    torch.testing.assert_close(logits(out, ids, pixels)[..., :vocab], logits(ref, ids, pixels)[..., :vocab])


@pytest.fixture(scope="module")
def good(tmp_path_factory, tokenizer_dir):
    """A valid original checkpoint (no tower) and its tower folder, for the error cases to break."""
    tmp = tmp_path_factory.mktemp("good")
    src, vocab = source(tmp, tokenizer_dir)
    ref = tiny_llava(vocab)
    write_bin_shards(src, original_weights(ref, vocab))
    write_tower(tmp / "clip", ref)
    return src, tmp / "clip", ref, vocab


def broken(tmp_path, good, config_changes=None, drop=()):
    src, _, ref, vocab = good
    folder = tmp_path / "broken"
    folder.mkdir()
    for file in src.iterdir():
        if file.name not in drop:
            (folder / file.name).write_bytes(file.read_bytes())
    if "config.json" not in drop:
        (folder / "config.json").write_text(json.dumps(original_config(ref, vocab, **(config_changes or {}))))
    return folder


@pytest.mark.parametrize(
    "changes, drop, tower, message",
    [
        (None, ("config.json",), True, "has no config.json"),
        ({"mm_projector_type": "mlp3x_gelu"}, (), True, "mm_projector_type 'mlp3x_gelu' is not supported"),
        (None, (), False, "holds no vision-tower weights"),
        ({"mm_hidden_size": 48}, (), True, "mm_hidden_size is 48, the vision tower's hidden_size 32"),
        ({"hidden_size": 96}, (), True, "config hidden_size is 96, the embeddings are 64 wide"),
        ({"text_config": {}}, (), True, "transformers' LLaVA format already"),
        ({"image_aspect_ratio": "anyres"}, (), True, "LLaVA-NeXT"),
        ({"mm_vision_select_feature": "cls"}, (), True, "mm_vision_select_feature 'cls' is not supported"),
        ({"intermediate_size": 100}, (), True, "is stored as [128, 64], the model needs [100, 64]"),
        (None, ("tokenizer.model", "tokenizer.json"), True, "has no tokenizer"),
    ],
)
def test_errors(tmp_path, good, changes, drop, tower, message):
    folder = broken(tmp_path, good, changes, drop)
    with pytest.raises(ConvertError, match=re.escape(message)):
        convert(folder, tmp_path / "dst", vision_tower=good[1] if tower else None)
    assert not (tmp_path / "dst").exists()  # nothing written


def test_cli_error(tmp_path, good, capsys):
    folder = broken(tmp_path, good)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert-llava", str(folder), str(tmp_path / "dst")])
    assert exit_.value.code == 2
    assert "pass --vision-tower PATH" in capsys.readouterr().err
