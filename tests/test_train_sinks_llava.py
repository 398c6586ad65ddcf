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
    # --lm-lr-scale 0: instruction tuning with the LM frozen (bit for bit) while the projector trains
    third = tsl.main(
        ["llava", "--out", str(tmp_path / "c"), "--init", str(out), "--steps", "2", "--test-scenes", "0"]
        + ["--lm-lr-scale", "0", *llava]
    )
    assert third["instruct_steps"] == 2
    c = LlavaForConditionalGeneration.from_pretrained(tmp_path / "c")
    tc = c.model.language_model.state_dict()
    assert all(torch.equal(tc[k], v) for k, v in text.items())
    pc, p0 = c.model.multi_modal_projector.state_dict(), model.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(pc[k], v) for k, v in p0.items())
    with pytest.raises(SystemExit):
        bad = ["llava", "--out", str(tmp_path / "d"), "--init", str(out), "--steps", "1"]
        tsl.main([*bad, "--lm-lr-scale", "2"])


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


# ----------------------------------------------------------------------------- FLIP patch masking


def _tiny_clip(seed=0):
    from types import SimpleNamespace

    a = SimpleNamespace(init=None, v_hidden=16, v_mlp=32, v_layers=2, v_heads=2, image_size=56, patch_size=7)
    a.__dict__.update(embed=16, t_hidden=16, t_layers=1, t_heads=2, caption_len=24)
    torch.manual_seed(seed)
    return tsl.build_clip(a, 100).train()  # 8 x 8 = 64 patches


def _batch(n=4):
    g = torch.Generator().manual_seed(1)
    pix = torch.randn(n, 3, 56, 56, generator=g)
    return pix, torch.randint(4, 100, (n, 24), generator=g), torch.randint(3, 25, (n,), generator=g)


def test_mask_ratio_zero_trains_bitwise_like_the_plain_tower():
    import copy

    plain = _tiny_clip()
    hooked = copy.deepcopy(plain)
    drop = tsl.PatchDrop(hooked.vision, 0.0)
    assert not drop.active and drop.keep == 64
    batch = _batch()
    loss_p, loss_h = plain(*batch), hooked(*batch)
    loss_p.backward()
    loss_h.backward()
    assert torch.equal(loss_p, loss_h)
    grads = dict(hooked.named_parameters())
    assert all(torch.equal(p.grad, grads[k].grad) for k, p in plain.named_parameters())


@pytest.mark.parametrize("ratio,kept", [(0.5, 32), (0.75, 16), (0.3, 45)])
def test_masked_forward_is_the_encoder_on_the_kept_embeddings(ratio, kept):
    clip = _tiny_clip()
    vision = clip.vision
    drop = tsl.PatchDrop(vision, ratio)
    pix = _batch()[0]
    out = vision(pixel_values=pix)
    idx = drop.last
    assert (
        drop.keep == kept and idx.shape == (4, 1 + kept) and out.last_hidden_state.shape == (4, 1 + kept, 16)
    )
    assert (idx[:, 0] == 0).all() and (idx[:, 1:] >= 1).all() and (idx[:, 1:] <= 64).all()
    assert all(len(set(row.tolist())) == 1 + kept for row in idx)  # no position twice
    assert len({tuple(row.tolist()) for row in idx}) == 4  # each image draws its own subset
    # reference: the plain embeddings, the kept rows picked by hand, then the tower's later modules in order
    drop.active = False
    with torch.no_grad():
        full = vision.embeddings(pix)
        picked = torch.stack([full[b, idx[b]] for b in range(4)])
        h = vision.encoder(inputs_embeds=vision.pre_layrnorm(picked)).last_hidden_state
        torch.testing.assert_close(out.last_hidden_state, h, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.pooler_output, vision.post_layernorm(h[:, 0]), rtol=1e-6, atol=1e-6)
        unmasked = vision(pixel_values=pix).last_hidden_state
        assert unmasked.shape == (4, 65, 16)
        # the dropped patches changed what the kept ones see
        assert not torch.allclose(torch.stack([unmasked[b, idx[b]] for b in range(4)]), h, atol=1e-4)
        # eval mode (probes, the saved tower) is unmasked even while active
        drop.active = True
        clip.eval()
        torch.testing.assert_close(vision(pixel_values=pix).last_hidden_state, unmasked, rtol=0, atol=0)


def test_kept_patches_are_a_uniform_subset():
    drop = tsl.PatchDrop(_tiny_clip().vision, 0.5)
    torch.manual_seed(3)
    idx = drop.positions(4000, "cpu")
    freq = torch.bincount(idx[:, 1:].flatten(), minlength=65)[1:].float() / 4000
    assert (freq - 0.5).abs().max() < 0.04, freq  # 5 standard deviations at 4000 draws
    assert (idx[:, 1:].diff(1) > 0).all()


def test_mask_ratio_refuses_bad_values():
    base = ["tower", "--out", "x", "--steps", "1", "--image-size", "28", "--patch-size", "14"]
    for bad in (
        ["--mask-ratio", "1"],
        ["--mask-ratio", "-0.1"],
        ["--mask-ratio", "0.9"],
        ["--unmasked-frac", "2"],
    ):
        with pytest.raises(SystemExit):
            tsl.parse(base + bad)
    assert tsl.parse(base + ["--mask-ratio", "0.75"]).mask_ratio == 0.75  # 1 of 4 patches


def test_masked_tower_pilot_learns_unmasks_at_the_end_and_continues(tmp_path, monkeypatch):
    tok_file, _ = _tiny_inputs(tmp_path)
    masked = []
    hook = tsl.PatchDrop._hook

    def counted(self, module, args, out):
        res = hook(self, module, args, out)
        masked.append(res is not None)
        return res

    monkeypatch.setattr(tsl.PatchDrop, "_hook", counted)
    args = ["--tokenizer", str(tok_file), "--batch", "8", "--scenes", "8", "--captions-per-scene", "1"]
    args += ["--val-scenes", "4", "--image-size", "56", "--patch-size", "7", "--caption-len", "96"]
    args += ["--v-hidden", "16", "--v-layers", "2", "--v-heads", "2", "--v-mlp", "32", "--t-hidden", "16"]
    args += ["--t-layers", "1", "--t-heads", "2", "--embed", "16", "--workers", "1", "--lr", "1e-2"]
    args += ["--log-every", "1", "--eval-every", "1000", "--warmup", "0.05"]
    a = tsl.main(
        ["tower", "--out", str(tmp_path / "a"), "--steps", "40", "--mask-ratio", "0.5"]
        + ["--unmasked-frac", "0.25", *args]
    )
    losses = [c["loss"] for c in a["curve"]]
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    # 30 masked steps of 32 of 64 patches, then 10 unmasked; the two probes (eval mode) unmasked
    assert a["patches_kept"] == 32 and a["unmasked_from_step"] == 30
    assert masked == [False] + [True] * 30 + [False] * 11
    saved = json.loads((tmp_path / "a" / "training.json").read_text())
    assert (saved["args"]["mask_ratio"], saved["args"]["unmasked_frac"]) == (0.5, 0.25)
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(tmp_path / "a" / "vision")  # a plain tower, all 64 patches
    assert tower.train()(pixel_values=_batch(2)[0]).last_hidden_state.shape == (2, 65, 16)
    # a masked run continues the saved tower
    masked.clear()
    b = tsl.main(
        ["tower", "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"), "--steps", "3"]
        + ["--mask-ratio", "0.75", *args]
    )
    assert b["previous"][0]["args"]["mask_ratio"] == 0.5 and b["patches_kept"] == 16
    assert masked == [False] + [True] * 3 + [False]
    assert b["probes"][0]["logit_scale"] == a["probes"][-1]["logit_scale"]
    va = load_file(tmp_path / "a" / "vision" / "model.safetensors")
    vb = load_file(tmp_path / "b" / "vision" / "model.safetensors")
    assert any(not torch.equal(va[k], vb[k]) for k in va)
