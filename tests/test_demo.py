"""The Gradio demo in a real headless Chromium (Debian's `chromium`, driven by Playwright): load the page,
run a sample, and see both answers, both FLOP counts and the token overlay. Also the Runner without a
browser (settings per request, errors as messages)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from mmsink.evals.reference_model import build_config, build_processor, build_tokenizer
from PIL import Image
from transformers import LlavaForConditionalGeneration

SAMPLES = Path(__file__).resolve().parent.parent / "demo" / "samples"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo_model")
    tok = build_tokenizer(["What color is the circle?", "What shape is it?"] * 20, vocab_size=300)
    proc = build_processor(tok)
    torch.manual_seed(0)
    cfg = build_config(tok, size="test")
    cfg.text_config.num_hidden_layers = 4
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runner(model_dir):
    from demo.app import Runner

    return Runner(model_dir)


def test_runner_settings_are_per_request(runner):
    import mmsink
    from demo.app import samples

    img = Image.open(samples()[0][0])
    a = runner.answer(img, "What color is the circle?", "fastv", 8, False, False)
    b = runner.answer(img, "What color is the circle?", "fastv", 40, False, False)
    assert a["stats"].kept_tokens[-1] == [8] and b["stats"].kept_tokens[-1] == [40]
    assert a["stats"].prefill_flops < b["stats"].prefill_flops < a["stats"].baseline_prefill_flops
    assert mmsink.api.get_handle(runner.model).pruner is None  # nothing left behind between requests
    with pytest.raises(ValueError, match="Choose or upload an image"):
        runner.answer(None, "q", "fastv", 8, False, False)
    with pytest.raises(ValueError, match="budget"):
        runner.answer(img, "q", "fastv", -3, False, False)


def test_fast_decoding_gives_generates_answers(runner, model_dir):
    """The demo decodes with generate_fast by default (VAR requests too); the answers are generate's."""
    from demo.app import Runner, samples

    slow = Runner(model_dir, fast=False)
    assert runner.fast and not slow.fast
    img = Image.open(samples()[1][0])
    for method, budget, var in [
        ("none (baseline only)", None, False),
        ("fastv", 8, False),
        ("pdrop", None, False),
        ("fastv", 8, {"sink_dims": (3, 17), "tau": 2.4}),
    ]:
        a = runner.answer(img, "What shape is it?", method, budget, var, False)
        b = slow.answer(img, "What shape is it?", method, budget, var, False)
        assert (a["baseline"], a["answer"]) == (b["baseline"], b["answer"])
        assert a["stats"].kept_tokens == b["stats"].kept_tokens


@pytest.fixture(scope="module")
def shipped_runner():
    from demo.app import DEFAULT_MODEL, Runner

    return Runner(DEFAULT_MODEL)  # the default: the bundled reference model


def test_page_in_chromium(shipped_runner, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail(
                "CI must run the browser test: install Debian's chromium (README's test command does)"
            )
        pytest.skip("Debian's chromium package is not installed")
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    from demo.app import serve_in_background

    app, port = serve_in_background(shipped_runner, wait_s=10.0)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            gold = json.loads((SAMPLES / "samples.json").read_text())[0]
            page.get_by_text(gold["question"]).first.click()  # a sample row fills image + question
            page.wait_for_function(
                "document.querySelector('#question textarea, #question input').value !== ''"
            )
            page.locator("#budget input").fill("64")
            page.locator("#run").click()
            page.wait_for_function(
                "(document.querySelector('#info') || {innerText: ''}).innerText.includes('saved')",
                timeout=60000,
            )
            base_info = page.locator("#base_info").inner_text()
            info = page.locator("#info").inner_text()
            assert "prefill FLOPs" in base_info and "prefill FLOPs" in info and "% saved" in info
            assert page.locator("#base_answer textarea").input_value() == gold["answer"]  # it reads the image
            assert page.locator("#answer textarea").input_value() != ""
            assert page.locator("#overlay img").count() >= 1
            page.screenshot(path=str(tmp_path / "page.png"))
            browser.close()
    finally:
        app.close()
