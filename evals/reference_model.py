"""The project's own reference model: a small LLaVA-architecture model trained on the synthetic VQA
benchmark (``evals/train_reference.py``). It is a plain ``LlavaForConditionalGeneration`` with a
byte-level BPE tokenizer built with ``tokenizers`` and a ``LlavaProcessor`` whose chat template follows
LLaVA-1.5 (system text, ``USER: <image>\\n... ASSISTANT:``), so prompts are laid out like real LLaVA.
"""

from __future__ import annotations

from pathlib import Path

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_TOKEN = "<image>"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "models" / "synthllava"

# LLaVA-1.5 (vicuna_v1) layout: "<s>SYSTEM USER: <image>\nQUESTION ASSISTANT: ANSWER</s>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if messages[0]['role'] != 'system' %}" + SYSTEM + "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def prompt_text(question: str) -> str:
    """The prompt string the processor expects for one image and one question."""
    return f"{SYSTEM} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def build_tokenizer(corpus, vocab_size: int = 1024):
    """Byte-level BPE trained on ``corpus`` (an iterable of strings); any text can be encoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return fast_tokenizer(tok)


def fast_tokenizer(tok, model_max_length: int = 1024):
    """A ``tokenizers`` BPE with the specials above as the model's tokenizer: ``<s>`` prepended, left
    padding, LLaVA-1.5's chat template (shared by both reference models)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer, image_size: int = 224, patch_size: int = 14):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, image_size: int = 224, patch_size: int = 14, size: str = "base"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    dims = {
        "base": dict(v_hidden=192, v_layers=6, v_heads=6, t_hidden=256, t_layers=8, t_heads=8),
        "test": dict(v_hidden=32, v_layers=1, v_heads=2, t_hidden=32, t_layers=2, t_heads=2),
    }[size]
    vision = CLIPVisionConfig(
        hidden_size=dims["v_hidden"],
        intermediate_size=4 * dims["v_hidden"],
        num_hidden_layers=dims["v_layers"],
        num_attention_heads=dims["v_heads"],
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=dims["v_hidden"],
    )
    text = LlamaConfig(
        hidden_size=dims["t_hidden"],
        intermediate_size=int(2.75 * dims["t_hidden"]),
        num_hidden_layers=dims["t_layers"],
        num_attention_heads=dims["t_heads"],
        num_key_value_heads=dims["t_heads"],
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    n_tokens = (image_size // patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
