"""Bad settings get clear errors that say what is allowed."""

import pytest
from tiny import batch, prompt, tiny_llava
from transformers import LlamaConfig, LlamaForCausalLM

import mmsink


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=8)


def test_methods_listed():
    assert set(mmsink.methods()) >= {
        "none",
        "fastv",
        "pdrop",
        "dart",
        "random",
        "pool",
        "visionzip",
        "visipruner",
    }


def test_unknown_method_lists_known(model):
    with pytest.raises(ValueError, match="unknown method 'fastvv'.*dart, divprune, fastv, none"):
        mmsink.wrap(model, prune="fastvv")


@pytest.mark.parametrize("budget", [0, -3, 0.0, 1.5, "64", True])
def test_bad_budget(model, budget):
    with pytest.raises(ValueError, match="budget"):
        mmsink.wrap(model, prune="fastv", budget=budget)


def test_budget_larger_than_image(model):
    with pytest.raises(ValueError, match="budget 37 is larger than the image's 36 visual tokens"):
        mmsink.wrap(model, prune="fastv", budget=37)
    # images whose size the config does not fix are checked when they arrive
    from mmsink.pruners.base import budget_tokens

    with pytest.raises(ValueError, match="budget 20 is larger than the image's 16 visual tokens"):
        budget_tokens(20, 16)
    assert budget_tokens(20, 36) == 20 and budget_tokens(0.25, 10) == 3 and budget_tokens(0.01, 10) == 1


def test_option_a_method_does_not_take(model):
    with pytest.raises(ValueError, match="does not take option.*'pivots'.*it takes: \\['k'\\]"):
        mmsink.wrap(model, prune="fastv", pivots=3)
    with pytest.raises(ValueError, match="does not take a budget"):
        mmsink.wrap(model, prune="none", budget=3)
    with pytest.raises(ValueError, match="need a method"):
        mmsink.wrap(model, budget=3)


@pytest.mark.parametrize(
    "method,opts,msg",
    [
        ("fastv", {"k": 8}, "k=8 must be <"),
        ("fastv", {"k": 0}, "k >= 1"),
        ("pdrop", {"ratio": 1.5}, "ratio"),
        ("pdrop", {"layers": (4, 2, 6)}, "increasing"),
        ("pdrop", {"layers": (2, 4, 9)}, "exceed"),
        ("visipruner", {"layer_threshold": 2.0}, "cosine"),
        ("visipruner", {"shallow_mid_layer": 9}, "exceeds"),
        ("dart", {"pivots": 0}, "pivots"),
    ],
)
def test_bad_method_options(model, method, opts, msg):
    with pytest.raises(ValueError, match=msg):
        mmsink.wrap(model, prune=method, **opts)
    assert "_mmsink" not in model.__dict__  # a failed wrap leaves nothing behind


def test_unsupported_model_class():
    lm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
        )
    )
    with pytest.raises(ValueError, match="unsupported model LlamaForCausalLM.*LlavaForConditionalGeneration"):
        mmsink.wrap(lm, prune="fastv")


def test_inner_module_rejected(model):
    with pytest.raises(ValueError, match="unsupported model|wrap the LlavaForConditionalGeneration"):
        mmsink.wrap(model.model, prune="fastv")


def test_inputs_embeds_without_ids(model):
    mmsink.wrap(model, prune="fastv", budget=6)
    inputs = batch([prompt(3, 3)])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    try:
        with pytest.raises(ValueError, match="pass input_ids"):
            model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"])
    finally:
        mmsink.unwrap(model)


def test_settings_errors_leave_no_wrapper(model):
    with pytest.raises(ValueError, match="sink_forward"):
        mmsink.wrap(model, prune="fastv", sink_forward={"factor": 0})
    assert "_mmsink" not in model.__dict__
