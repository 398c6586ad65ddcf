"""The Gradio demo in a real headless Chromium (Debian's `chromium`, driven by Playwright): load the page,
run a sample, and see both answers, both FLOP counts and the token overlay. Also the Runner without a
browser (settings per request, errors as messages)."""

import contextlib
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
    from mmsink.demo.app import Runner

    return Runner(model_dir)


def test_runner_settings_are_per_request(runner):
    from mmsink.demo.app import samples

    import mmsink

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
    from mmsink.demo.app import Runner, samples

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
    from mmsink.demo.app import DEFAULT_MODEL, Runner

    return Runner(DEFAULT_MODEL)  # the default: the bundled reference model


@contextlib.contextmanager
def demo_in_chromium(runner):
    """(a headless Debian chromium, the port of the demo served in the background); CI must have the
    browser (README's test command installs it), elsewhere the test is skipped without it."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail(
                "CI must run the browser test: install Debian's chromium (README's test command does)"
            )
        pytest.skip("Debian's chromium package is not installed")
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    from mmsink.demo.app import serve_in_background

    app, port = serve_in_background(runner, wait_s=10.0)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            yield browser, port
            browser.close()
    finally:
        app.close()


def test_page_in_chromium(shipped_runner, tmp_path):
    with demo_in_chromium(shipped_runner) as (browser, port):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
        gold = json.loads((SAMPLES / "samples.json").read_text())[0]
        page.get_by_text(gold["question"]).first.click()  # a sample row fills image + question
        page.wait_for_function("document.querySelector('#question textarea, #question input').value !== ''")
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


def test_form_errors_speak_the_forms_language(runner):
    """Budget 1.5 / -5, VAR dimensions 'abc', a budget with the baseline only, an unreadable upload and a
    question longer than the model's context: a message about the field, not Python's or the API's."""
    from mmsink.demo.app import BadImage, FormError, samples

    img = Image.open(samples()[0][0])
    cases = [
        (dict(budget=1.5), "neither a fraction below 1 nor a whole number"),
        (dict(budget=-5), "is negative"),
        (dict(var="abc"), "channel numbers separated by commas"),
        (dict(var="1, 99999"), "must lie between 0 and"),
        (dict(method="none (baseline only)", budget=8), "baseline-only setting takes no budget"),
        (dict(method="none", budget=8), "takes no budget"),
        (dict(image=BadImage("x.png is not an image")), "x.png is not an image"),
        (dict(question="what " * 1200), "too long for this model"),
        (dict(budget=9999), "larger than the image"),
    ]
    for change, words in cases:
        args = dict(image=img, question="What color is the circle?", method="fastv", budget=8, var=False)
        args.update(change)
        with pytest.raises(FormError, match=words) as e:
            runner.answer(args["image"], args["question"], args["method"], args["budget"], args["var"], False)
        assert "int()" not in str(e.value) and "mmsink:" not in str(e.value)
    assert runner.answer(img, "What color is the circle?", "fastv", "0.25", "", False)["stats"].budget == 0.25


def test_kept_everything_says_so():
    from types import SimpleNamespace

    from mmsink.demo.app import saved_text

    st = SimpleNamespace(
        prefill_flops=1003, baseline_prefill_flops=1000, kept_tokens=[[4], [4]], visual_tokens=[4]
    )
    assert saved_text(st) == "kept all 4 visual tokens in every layer; its selection cost 0.3% more FLOPs"
    st = SimpleNamespace(
        prefill_flops=500, baseline_prefill_flops=1000, kept_tokens=[[4], [2]], visual_tokens=[4]
    )
    assert saved_text(st) == "50.0% saved"


def test_two_columns_at_1366_and_a_bad_upload_in_chromium(shipped_runner, tmp_path):
    """At 1366 px (a common laptop width) baseline and mmsink sit side by side; a non-image uploaded as
    .png shows why it cannot run."""
    with demo_in_chromium(shipped_runner) as (browser, port):
        for width in (1366, 1280, 1440):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            a = page.locator("#base_answer").bounding_box()
            b = page.locator("#answer").bounding_box()
            assert abs(a["y"] - b["y"]) < 2 and b["x"] >= a["x"] + a["width"], (width, a, b)
            assert a["width"] > 200 and b["width"] > 200
            if width == 1366:
                fake = tmp_path / "notes.png"
                fake.write_text("this is text, not a PNG")
                page.locator("#image input[type=file]").set_input_files(str(fake))
                page.locator("#question textarea, #question input").first.fill("What color is it?")
                page.locator("#run").click()
                page.wait_for_function(
                    "(document.querySelector('#error') || {innerText: ''})"
                    ".innerText.includes('not an image')",
                    timeout=60000,
                )
                assert "notes.png" in page.locator("#error").inner_text()
                page.locator("#error").scroll_into_view_if_needed()
                page.screenshot(path=str(tmp_path / f"page{width}.png"))
            page.close()
