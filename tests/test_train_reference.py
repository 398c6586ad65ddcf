"""The reference-model trainer: its shortcut loss (cached frozen-tower features, answer positions only)
equals the model's own loss, its conversations start with exactly the prompt the processor builds, and a
chained run continues from a saved model."""

import json

import numpy as np
import torch
from mmsink.evals import train_reference as tr
from mmsink.evals.reference_model import build_config, build_processor, build_tokenizer, prompt_text
from transformers import LlavaForConditionalGeneration


def _setup(n=6):
    scenes, questions, answers, images = tr.train_split(n, seed=3, qps=4, workers=1)
    corpus = [q["text"] + " " + a["answer"] for q, a in zip(questions, answers)]
    processor = build_processor(build_tokenizer(corpus, vocab_size=400))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build_config(processor.tokenizer, size="test")).eval()
    return scenes, questions, answers, images, processor, model


def test_cached_feature_loss_equals_model_loss():
    scenes, questions, answers, images, processor, model = _setup()
    tok = processor.tokenizer
    ids, labels = tr.encode_conversations(
        tok, scenes, questions, answers, np.random.default_rng(0), model.config.image_seq_length
    )
    x, m, y = tr.padded(ids, labels, tok.pad_token_id, "cpu")
    feats = tr.vision_features(model, torch.from_numpy(images), "cpu")
    with torch.no_grad():
        ours = tr.lm_loss(model, feats, x, m, y, model.config.image_token_id)
        theirs = model(input_ids=x, attention_mask=m, pixel_values=tr.pixels(images, "cpu"), labels=y).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_first_turn_is_the_processor_prompt():
    scenes, questions, answers, images, processor, model = _setup(2)
    tok = processor.tokenizer
    ids, labels = tr.encode_conversations(
        tok, scenes, questions, answers, np.random.default_rng(0), model.config.image_seq_length
    )
    n_img = model.config.image_seq_length
    for seq, lab, scene in zip(ids, labels, scenes):
        first = next(i for i, v in enumerate(lab) if v != -100)  # first answer token
        prompt = tok.decode(seq[:first])
        asked = [q for q in questions if q["image"] == scene.scene_id + ".png"]
        match = [
            q
            for q in asked
            if prompt.replace("<image>" * n_img, "<image>").endswith(q["text"] + " ASSISTANT:")
        ]
        assert len(match) == 1
        expected = tok(prompt_text(match[0]["text"]).replace("<image>", "<image>" * n_img))["input_ids"]
        assert seq[:first] == expected
        assert lab.count(tok.eos_token_id) == len(asked)  # every turn ends with a supervised </s>


def test_chained_run_continues_from_saved_model(tmp_path):
    common = ["--train-scenes", "12", "--val-scenes", "2", "--test-scenes", "2", "--batch", "4"]
    common += ["--size", "test", "--workers", "1", "--eval-every", "100", "--vision-batch", "4"]
    first = tr.main(["--out", str(tmp_path / "a"), "--steps", "3", "--vision-steps", "2", *common])
    second = tr.main(
        [
            "--out",
            str(tmp_path / "b"),
            "--init",
            str(tmp_path / "a"),
            "--steps",
            "2",
            "--vision-steps",
            "0",
            *common,
        ]
    )
    assert second["previous"]["steps_done"] == first["steps_done"] == 3
    a = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    b = LlavaForConditionalGeneration.from_pretrained(tmp_path / "b")
    va, vb = a.model.vision_tower.state_dict(), b.model.vision_tower.state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)  # frozen tower carried over unchanged
    la, lb = a.model.language_model.state_dict(), b.model.language_model.state_dict()
    assert any(not torch.equal(la[k], lb[k]) for k in la)  # the language model trained on
    assert json.loads((tmp_path / "b" / "training.json").read_text())["init"] == str(tmp_path / "a")
