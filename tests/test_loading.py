"""mmsink inspect / calibrate on saved checkpoints of every family through the one loader, and one-line
refusals of folders, devices and data files they cannot use."""

import json

import pytest
import torch
from PIL import Image
from saved import SAVERS

from mmsink.tools.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: save(root / name) for name, save in SAVERS.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(60, 80, 3, generator=g) * 255).byte().numpy()).save(root / "a.png")
    lines = [
        {"question_id": 1, "image": "a.png", "text": "What color is the square?"},
        {"question_id": 2, "image": "a.png", "text": "How many circles are there?"},
    ]
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def one_error_line(capsys, command):
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("mmsink")]
    assert len(err) == 1 and err[0].startswith(f"mmsink {command}: error: "), err
    return err[0]


@pytest.mark.parametrize("family", list(SAVERS))
def test_inspect_and_calibrate_every_family(folders, data, family, tmp_path):
    model = str(folders[family])
    assert (
        main(
            [
                "inspect",
                "--model",
                model,
                "--image",
                str(data / "a.png"),
                "--question",
                "What color?",
                "--out",
                str(tmp_path / "ins"),
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "ins" / "inspect.json").read_text())
    assert len(rep["layers"]) == 2 and rep["image_tokens"] > 0
    assert (tmp_path / "ins" / "inspect.png").stat().st_size > 1000
    assert (
        main(
            [
                "calibrate",
                "--model",
                model,
                "--data",
                str(data / "q.jsonl"),
                "--images",
                str(data),
                "--out",
                str(tmp_path / "c.json"),
            ]
        )
        == 0
    )
    cal = json.loads((tmp_path / "c.json").read_text())
    assert cal["model_type"] == json.loads((folders[family] / "config.json").read_text())["model_type"]
    assert cal["samples"] == 2 and cal["num_layers"] == 2


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["inspect", "calibrate"])
def test_text_only_checkpoint_refused_before_building(
    llama_dir, data, command, tmp_path, capsys, monkeypatch
):
    import transformers

    def no_build(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_build)
    args = {
        "inspect": ["--image", str(data / "a.png"), "--question", "q", "--out", str(tmp_path / "o")],
        "calibrate": [
            "--data",
            str(data / "q.jsonl"),
            "--images",
            str(data),
            "--out",
            str(tmp_path / "c.json"),
        ],
    }[command]
    with pytest.raises(SystemExit) as e:
        main([command, "--model", str(llama_dir), *args])
    assert e.value.code == 1
    line = one_error_line(capsys, command)
    assert "'llama'" in line and "LlavaForConditionalGeneration" in line and "Qwen2VL" in line


def test_calibrate_bad_or_missing_data_is_one_line(folders, data, tmp_path, capsys):
    model = str(folders["llava"])
    base = ["calibrate", "--model", model, "--images", str(data), "--out", str(tmp_path / "c.json")]
    with pytest.raises(SystemExit) as e:
        main([*base, "--data", str(tmp_path / "nope.jsonl")])
    assert e.value.code == 1 and "no such file" in one_error_line(capsys, "calibrate")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"question_id": 1, "image": "a.png"\nnot json\n{"question_id": 2, "image": "x.png", "text": "q"}\n'
    )
    with pytest.raises(SystemExit) as e:
        main([*base, "--data", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert "line 1" in err and "line 2" in err and "x.png" in err and "no usable sample" in err
    # one good record among bad ones: calibrated on it, the others reported
    bad.write_text(bad.read_text() + json.dumps({"question_id": 3, "image": "a.png", "text": "q"}) + "\n")
    assert main([*base, "--data", str(bad)]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["samples"] == 1


def test_output_location_checked_before_the_model_loads(data, tmp_path, capsys, monkeypatch):
    import mmsink.tools.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "file").write_text("x")
    q = ["--data", str(data / "q.jsonl"), "--images", str(data)]
    for out, words in [(tmp_path, "is a folder"), (tmp_path / "file" / "c.json", "not a folder")]:
        with pytest.raises(SystemExit):
            main(["calibrate", "--model", "m", *q, "--out", str(out)])
        assert words in one_error_line(capsys, "calibrate")
    with pytest.raises(SystemExit):
        main(
            [
                "inspect",
                "--model",
                "m",
                "--image",
                str(data / "a.png"),
                "--question",
                "q",
                "--out",
                str(tmp_path / "file"),
            ]
        )
    assert "is a file" in one_error_line(capsys, "inspect")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(folders, data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "inspect",
                "--model",
                str(folders["llava"]),
                "--image",
                str(data / "a.png"),
                "--question",
                "q",
                "--device",
                "cuda",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert "no CUDA device" in one_error_line(capsys, "inspect")


@pytest.mark.parametrize("family", list(SAVERS))
def test_eval_on_every_family(folders, data, family, tmp_path):
    """eval loads every family through the same loader and answers a batch of two (padded) questions."""
    out = tmp_path / "a.jsonl"
    argv = ["eval", "--model", str(folders[family]), "--bench", str(data / "q.jsonl"), "--images", str(data)]
    argv += [
        "--prune",
        "fastv",
        "--budget",
        "0.5",
        "--opt",
        "k=1",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "2",
        "--no-progress",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question_id"] for r in recs] == [1, 2]
    assert all(0 < r["metadata"]["kept_tokens_final"] < r["metadata"]["kept_tokens"] for r in recs)
