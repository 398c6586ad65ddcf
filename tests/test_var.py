"""VAR against a plain eager reference written from the paper (full attention matrices in the test only),
in prefill and in decoding, alone and with pruning; and its settings' errors."""

import pytest
import torch
from reference import run
from tiny import batch, llava_single, prompt, tiny_llava

import mmsink
from mmsink.sinks.var import VARConfig

# the tiny random model has no massive activations: a low tau over a few channels makes sinks appear
VAR = {"sink_dims": (3, 17, 40, 51), "tau": 2.4, "rho": 0.5, "p": 0.6}
LAYERS = list(range(2, 7))  # 2 .. L-2 for 8 layers


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    return tiny_llava(layers=8, attn=request.param)


@pytest.mark.parametrize(
    "method,opts",
    [
        (None, {}),
        ("fastv", {"budget": 9}),
        ("pdrop", {"layers": (2, 4, 6), "ratio": 0.5}),
        ("random", {"budget": 7}),
    ],
)
def test_prefill_matches_reference(model, method, opts):
    changed = 0.0
    for seed in (1, 2, 3):
        inputs = batch([prompt(5, 9, seed=seed)], seed=seed)
        ref_opts = dict(opts, k=2, num_layers=8)
        with torch.no_grad():
            ref, _ = run(
                model,
                inputs["input_ids"][0],
                inputs["pixel_values"],
                method,
                var=dict(VAR, layers=LAYERS),
                **ref_opts,
            )
            plain, _ = run(model, inputs["input_ids"][0], inputs["pixel_values"], method, **ref_opts)
            mmsink.wrap(model, prune=method, var=VAR, **opts)
            try:
                out = model(**inputs).logits[0, -1]
            finally:
                mmsink.unwrap(model)
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
        changed = max(changed, float((ref - plain).abs().max()))
    assert changed > 1e-3  # VAR changed some answer: the comparison has teeth


def test_decode_matches_reference(model):
    """Greedy tokens of cached generation equal greedy decoding with the reference recomputing the whole
    sequence (generated tokens are query rows after the image and never sinks)."""
    p = prompt(5, 9, seed=3)
    inputs = batch([p], seed=3)
    mmsink.wrap(model, prune="fastv", budget=9, var=VAR)
    try:
        with torch.no_grad():
            got = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, len(p) :].tolist()
    finally:
        mmsink.unwrap(model)
    ids = inputs["input_ids"][0]
    want = []
    with torch.no_grad():
        for _ in range(4):
            logits, _ = run(
                model,
                ids,
                inputs["pixel_values"],
                "fastv",
                var=dict(VAR, layers=LAYERS),
                prompt_len=len(p),
                budget=9,
                k=2,
                num_layers=8,
            )
            nxt = int(logits.argmax())
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([nxt])])
    assert got == want


def test_batched_cached_uncached(model):
    prompts = [prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(4, 9, seed=3, images=2)]
    inputs = batch(prompts, seed=5)
    mmsink.wrap(model, prune="dart", budget=8, var=VAR)
    try:
        with torch.no_grad():
            a = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            b = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
            out = model(**inputs).logits[:, -1]
            for i in range(len(prompts)):
                one = llava_single(inputs, prompts, i)
                torch.testing.assert_close(out[i], model(**one).logits[0, -1], atol=1e-4, rtol=1e-4)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad,msg",
    [
        ({"rho": 1.5}, "rho"),
        ({"tau": 0}, "tau"),
        ({"p": -0.1}, "p must"),
        ({"sink_dims": ()}, "sink_dims"),
    ],
)
def test_bad_settings(bad, msg):
    with pytest.raises(ValueError, match=msg):
        VARConfig(**dict(VAR, **bad))


def test_needs_sink_dims_and_fits_model():
    m = tiny_llava(layers=8)
    with pytest.raises(ValueError, match="needs sink_dims"):
        mmsink.wrap(m, var=True)
    with pytest.raises(ValueError, match="exceed the hidden size"):
        mmsink.wrap(m, var={"sink_dims": (64,)})
    with pytest.raises(ValueError, match="var must be"):
        mmsink.wrap(m, var="yes")


def test_text_only_passes_through():
    m = tiny_llava(layers=8)
    text = {"input_ids": torch.randint(3, 90, (2, 11)), "attention_mask": torch.ones(2, 11, dtype=torch.long)}
    with torch.no_grad():
        ref = m(**text).logits
        mmsink.wrap(m, var=VAR)
        assert torch.equal(m(**text).logits, ref)


def test_device_reads_do_not_grow_with_var_layers(model):
    """VAR's groups change every layer; they are masks, not index lists, and the edited rows are indexed
    once per segment, so a prefill reads the device the same number of times with VAR in 2 layers or in
    6 (each read is a host-device sync on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])

    def reads(layers):
        mmsink.wrap(model, var={**VAR, "layers": layers})
        try:
            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
                model(**inputs)
        finally:
            mmsink.unwrap(model)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")

    assert reads(tuple(range(2, 8))) == reads((2, 3))


def test_no_host_data_per_var_layer(model):
    """A VAR layer builds no tensor from host data (on a GPU each is a blocking host-to-device copy): a
    prefill makes as many with VAR in 6 layers as in 2, warm (constants made once per device kept)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostData(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.lift_fresh.default
            return func(*args, **(kwargs or {}))

    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])

    def host_data(layers):
        mmsink.wrap(model, var={**VAR, "layers": layers})
        try:
            with torch.no_grad():
                model(**inputs)
                with HostData() as mode:
                    model(**inputs)
        finally:
            mmsink.unwrap(model)
        return mode.count

    assert host_data(tuple(range(2, 8))) == host_data((2, 3))


def test_presets_set_rho_and_explicit_values_win():
    """The paper's rho per task kind; the general one is the default; an explicit rho wins."""
    from mmsink.sinks.var import make_config

    assert make_config({"sink_dims": (1,)}).rho == 0.8
    assert make_config({"sink_dims": (1,), "preset": "hallucination"}).rho == 0.5
    assert make_config({"sink_dims": (1,), "preset": "vision-centric"}).rho == 0.9
    assert make_config({"sink_dims": (1,), "preset": "hallucination", "rho": 0.7}).rho == 0.7
    with pytest.raises(ValueError, match="preset"):
        make_config({"sink_dims": (1,), "preset": "pope"})


def test_code_vector_is_codes():
    from mmsink.sinks.var import CODES, code_vector

    assert code_vector(torch.device("cpu")).tolist() == list(CODES)
