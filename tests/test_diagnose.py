"""mmsink calibrate / inspect on a tiny model with a planted massive activation."""

import json

import pytest
import torch
from mmsink.evals.reference_model import build_config, build_processor, build_tokenizer
from PIL import Image
from transformers import LlavaForConditionalGeneration

import mmsink
from mmsink.tools.calibrate import calibrate, vit_threshold
from mmsink.tools.inspector import inspect_model, plot

DIM = 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = build_tokenizer(["What color is the square?", "How many circles are there?"] * 20, vocab_size=300)
    proc = build_processor(tok, image_size=56)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build_config(tok, image_size=56, size="test")).eval()

    # a massive activation: channel DIM of the first token from layer 1 on, as in real LLMs
    def plant(module, args, kwargs):
        h = args[0].clone()
        h[:, 0, DIM] += 500.0
        return (h, *args[1:]), kwargs

    model.model.language_model.layers[1].register_forward_pre_hook(plant, with_kwargs=True)
    img = Image.fromarray((torch.rand(56, 56, 3) * 255).byte().numpy())
    return model, proc, img


def test_calibrate_finds_planted_dim_and_config_applies(tiny, tmp_path):
    model, proc, img = tiny
    result = calibrate(
        model, proc, [(img, "What color is the square?"), (img, "How many circles are there?")]
    )
    assert result["sink_dims"][0] == DIM
    assert "massive" in result["sink_dims_rule"]
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(result))
    mmsink.wrap(model, var=True, config=path)
    assert mmsink.api.get_handle(model).var.sink_dims == (DIM,) + tuple(result["sink_dims"][1:])
    mmsink.unwrap(model)
    with pytest.raises(ValueError, match="not a calibration file"):
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        mmsink.wrap(model, var=True, config=bad)


def test_inspect_reports_layers(tiny, tmp_path):
    model, proc, img = tiny
    # hidden size 32: |x_d| / RMS(x) is at most sqrt(32), so the paper's tau = 20 cannot fire here
    rep = inspect_model(model, proc, img, "What color is the square?", tau=4.0)
    n_layers = len(model.model.language_model.layers)
    assert len(rep["layers"]) == n_layers == len(rep["contribution"])
    assert set(rep["massive_activations"]) == {str(i) for i in range(1, n_layers)}
    assert rep["sink_dims"] == [DIM]
    assert all(r["sink_tokens"] == [0] for r in rep["layers"][1:])  # token 0 carries the planted channel
    assert rep["image_tokens"] == 16
    plot(rep, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_vit_threshold():
    norms = torch.cat([torch.full((200,), 40.0) + torch.rand(200), torch.tensor([130.0, 150.0])])
    t = vit_threshold(norms)
    assert 41 < t < 130
    assert vit_threshold(torch.full((100,), 5.0) + torch.rand(100)) is None


def test_command_lines(tiny, tmp_path):
    from mmsink.tools.cli import main

    model, proc, img = tiny
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    img.save(tmp_path / "a.png")
    (tmp_path / "q.jsonl").write_text(
        json.dumps({"question_id": 1, "image": "a.png", "text": "What color?"}) + "\n"
    )
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tmp_path / "m"),
                "--data",
                str(tmp_path / "q.jsonl"),
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "c.json"),
            ]
        )
        == 0
    )
    cal = json.loads((tmp_path / "c.json").read_text())
    assert cal["samples"] == 1 and cal["model_type"] == "llava" and isinstance(cal["sink_dims"], list)
    assert (
        main(
            [
                "inspect",
                "--model",
                str(tmp_path / "m"),
                "--image",
                str(tmp_path / "a.png"),
                "--question",
                "What color?",
                "--out",
                str(tmp_path / "ins"),
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "ins" / "inspect.json").read_text())
    assert len(rep["layers"]) == 2 and (tmp_path / "ins" / "inspect.png").exists()
