"""The multimodal stage of models/synthllava-sinks (evals/train_sinks_llava.py): captions describe the whole
scene in varied wording, and the two stages build a model folder that loads the way users load it
(AutoProcessor / LlavaForConditionalGeneration and mmsink's own loader), with the tower and the
pre-trained LM carried over unchanged where a stage must not train them."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from mmsink.evals import train_sinks_llava as tsl
from mmsink.evals.reference_model import build_tokenizer, prompt_text
from mmsink.evals.synthvqa import SceneObject, make_scenes, render_scene
from mmsink.evals.train_sinks import build_model
from safetensors.torch import load_file


def test_caption_names_every_object_digit_and_background():
    scenes = make_scenes("train", 40, seed=5)
    for k, scene in enumerate(scenes):
        for seed in range(3):
            text = tsl.caption(scene, np.random.default_rng([k, seed]))
            want = Counter(f"{o.color} {o.shape}" for o in scene.objects)
            said = Counter(
                m.group(0) for m in re.finditer(r"\b(red|green|blue|yellow|purple|orange) \w+?(?=\b)", text)
            )
            assert said == want, text
            assert scene.background.name in text
            assert Counter(re.findall(r"handwritten (\d)", text)) == Counter(
                str(d.value) for d in scene.digits
            )
    # the wording varies between draws for the same scene
    assert len({tsl.caption(scenes[0], np.random.default_rng(s)) for s in range(12)}) > 6


@pytest.mark.parametrize(
    "box,words",
    [
        ((0, 0, 30, 30), ({"top", "upper"}, {"left"})),
        ((190, 190, 224, 224), ({"bottom", "lower"}, {"right"})),
        ((100, 0, 124, 20), ({"top", "upper"}, set())),
        ((0, 100, 20, 124), (set(), {"left"})),
    ],
)
def test_place_words_match_the_grid_cell(box, words):
    vert, horiz = words
    for s in range(10):
        w = tsl.place(SceneObject("circle", "red", "small", box).bbox, 224, np.random.default_rng(s))
        if vert:
            assert vert & set(re.split(r"[ -]", w)), w
        else:
            assert not {"top", "upper", "bottom", "lower"} & set(re.split(r"[ -]", w)), w
        if horiz:
            assert horiz & set(re.split(r"[ -]", w)), w
        else:
            assert not {"left", "right"} & set(re.split(r"[ -]", w)), w


def _tiny_inputs(tmp_path):
    scenes = make_scenes("train", 30, seed=1)
    corpus = [tsl.caption(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
    corpus += [prompt_text("What color is the red circle? How many digits?") + " yes no 3"]
    fast = build_tokenizer(corpus, vocab_size=400)
    tok_file = tmp_path / "tokenizer.json"
    fast.backend_tokenizer.save(str(tok_file))
    torch.manual_seed(0)
    lm = build_model(
        len(fast), layers=1, hidden=32, heads=2, ffn=64, max_pos=2048, kv_heads=1, rope_theta=5e5
    )
    lm.to(torch.bfloat16).save_pretrained(tmp_path / "lm")  # the same format as the real LM checkpoint
    return tok_file, tmp_path / "lm"


def test_model_folder_loads_through_the_users_path(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmsink.tools.loading import encode, load_model, prompt_for

    tok_file, lm_dir = _tiny_inputs(tmp_path)
    common = ["--workers", "1", "--seed", "0", "--log-every", "1", "--eval-every", "1000"]
    tiny_tower = ["--v-hidden", "16", "--v-layers", "2", "--v-heads", "2", "--v-mlp", "32"]
    tiny_tower += ["--t-hidden", "16", "--t-layers", "1", "--t-heads", "2", "--embed", "16"]
    rec = tsl.main(
        ["tower", "--out", str(tmp_path / "tower"), "--tokenizer", str(tok_file), "--steps", "2"]
        + ["--batch", "4", "--scenes", "8", "--val-scenes", "4", *tiny_tower, *common]
    )
    assert rec["steps_done"] == 2 and len(rec["curve"]) == 2
    llava = ["--train-scenes", "4", "--val-scenes", "0", "--batch", "2"]
    llava += ["--questions-per-scene", "2", *common]
    out = tmp_path / "model"
    tsl.main(
        ["llava", "--out", str(out), "--tower", str(tmp_path / "tower"), "--lm", str(lm_dir)]
        + ["--tokenizer", str(tok_file), "--align-steps", "2", "--steps", "0", "--test-scenes", "0", *llava]
    )
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    # stage 1 trains the projector alone: the tower and the pre-trained LM are the saved ones, bit for bit
    vision = load_file(tmp_path / "tower" / "vision" / "model.safetensors")
    ours = model.model.vision_tower.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in vision.items())
    lm = load_file(lm_dir / "model.safetensors")
    text = model.model.language_model.state_dict()
    assert all(
        torch.equal(text[k.removeprefix("model.")], v) for k, v in lm.items() if k.startswith("model.")
    )
    assert torch.equal(model.lm_head.weight, lm["model.embed_tokens.weight"])  # tied, as the LM was
    # the processor's prompt is the training layout, with one <image> per visual token
    question = "What color is the red circle?\nAnswer the question using a single word or phrase."
    assert prompt_for(processor, question) == prompt_text(question)
    img = make_scenes("test", 1, seed=0)[0]
    enc = encode(processor, render_scene(img), question, "cpu")
    n_img = model.config.image_seq_length
    expected = processor.tokenizer(prompt_text(question).replace("<image>", "<image>" * n_img))["input_ids"]
    assert enc["input_ids"][0].tolist() == expected
    # mmsink's loader (eval, demo, inspect) takes the folder and answers
    m2, p2 = load_model(out, device="cpu")
    gen = m2.generate(**encode(p2, render_scene(img), question, "cpu"), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 3 or gen[0, -1] == p2.tokenizer.eos_token_id
    # a chained instruction-tuning run from the saved model trains the LM, not the tower
    second = tsl.main(
        [
            "llava",
            "--out",
            str(tmp_path / "b"),
            "--init",
            str(out),
            "--steps",
            "2",
            "--test-scenes",
            "1",
            *llava,
        ]
    )
    assert second["instruct_steps"] == 2 and second["align_steps"] == 0
    assert second["previous"][0]["align_steps"] == 2
    b = LlavaForConditionalGeneration.from_pretrained(tmp_path / "b")
    vb = b.model.vision_tower.state_dict()
    assert all(torch.equal(vb[k], v) for k, v in ours.items())
    tb = b.model.language_model.state_dict()
    assert any(not torch.equal(tb[k], v) for k, v in text.items())
    record = json.loads((tmp_path / "b" / "training.json").read_text())
    assert record["test_questions"] == 3 and {"overall"} <= set(record["test_accuracy"])
    assert {"overall"} <= set(record["noise_image_accuracy"])


def test_tower_run_continues_from_saved_tower(tmp_path):
    tok_file, _ = _tiny_inputs(tmp_path)
    args = [
        "--tokenizer",
        str(tok_file),
        "--steps",
        "2",
        "--batch",
        "4",
        "--scenes",
        "8",
        "--val-scenes",
        "4",
    ]
    args += ["--v-hidden", "16", "--v-layers", "1", "--v-heads", "2", "--v-mlp", "32", "--t-hidden", "16"]
    args += ["--t-layers", "1", "--t-heads", "2", "--embed", "16", "--workers", "1", "--lr", "1e-2"]
    first = tsl.main(["tower", "--out", str(tmp_path / "a"), *args])
    second = tsl.main(["tower", "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"), *args])
    assert second["previous"][0]["steps_done"] == first["steps_done"] == 2
    # the temperature and projections come back with the tower (kept in fp32), so training continues from them
    assert (
        second["probes"][0]["logit_scale"]
        == first["probes"][-1]["logit_scale"]
        != first["probes"][0]["logit_scale"]
    )
    a = load_file(tmp_path / "a" / "vision" / "model.safetensors")
    b = load_file(tmp_path / "b" / "vision" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_stage_defaults_are_per_stage():
    # the tower's batch / lr defaults once silently became the llava stage's (argparse shared actions)
    from evals.train_sinks_llava import parse

    tower = parse(["tower", "--out", "x", "--steps", "1"])
    llava = parse(["llava", "--out", "x", "--steps", "1"])
    assert (tower.batch, tower.lr) == (1024, 1e-3)
    assert (llava.batch, llava.lr) == (256, 3e-4)
    assert parse(["tower", "--out", "x", "--steps", "1", "--lr", "2e-3"]).lr == 2e-3
