"""OrthoRank's per-layer form (``prune="orthorank", form="layers"``): tokens skip a layer and come back.
Checked against the plain model (every token selected: logits and cache), the plain reference of the
paper's form (``orthorank_paper.py``: selected sets and logits, several seeds, prompts with and without
images), the layer's own input (a token that skipped a layer carries exactly the state it entered with),
FlopCounterMode (batch and per sample), per-sample runs of a padded batch, and uncached / fast greedy
decoding. ``wrap(model, orthorank={...})`` is the same run; VAR is refused; ViT sinks are always updated."""

import pytest
import torch
from orthorank_paper import orthorank_layers
from test_orthorank import FAMILIES, LLAVA_PROMPTS, built
from tiny import IMAGE_TOKEN, batch, counted_prefill, llava_single, prompt, tiny_llava
from torch.utils.flop_counter import FlopCounterMode

import mmsink
from mmsink.api import get_handle

LAYERS = dict(prune="orthorank", form="layers")


def wrapped(model, inputs, **settings):
    """(output, stats) of one no-grad forward under ``wrap(model, **LAYERS, **settings)``; unwrapped after."""
    mmsink.wrap(model, **LAYERS, **settings)
    try:
        with torch.no_grad():
            out = model(**inputs)
        return out, mmsink.stats(model)
    finally:
        mmsink.unwrap(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_token_selected_is_the_plain_model(family):
    model, inputs = built(family)
    with torch.no_grad():
        ref = model(**inputs)
    out, st = wrapped(model, inputs, budget=1.0, layer=1)
    assert set(st.extra["orthorank"]["updated"]) == {1, 2, 3}  # the layers did run on a selection
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(out.past_key_values.layers, ref.past_key_values.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layer,ratio,sink", [(1, 0.5, "first"), (2, 0.3, "first"), (1, 0.6, "max_norm")])
def test_selected_sets_and_logits_equal_the_reference(family, seed, layer, ratio, sink):
    model, inputs = built(family, seed=seed)
    for one in (FAMILIES[family][2](inputs, i) for i in range(3)):  # the last prompt has no image
        out, st = wrapped(model, one, budget=ratio, layer=layer, sink=sink)
        log = {}
        mask = one["attention_mask"]
        with torch.no_grad(), orthorank_layers(model, range(layer, 4), ratio, mask, log=log, sink=sink):
            ref = model(**one).logits
        got = st.extra["orthorank"]["updated_indices"]
        assert sorted(got) == list(range(layer, 4))
        for li in range(layer, 4):
            assert got[li][0] == log[li][0][0].nonzero().flatten().tolist(), li
        n = one["input_ids"].shape[1]
        assert len(got[layer][0]) < n  # tokens did skip layers
        torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)


def test_chosen_layers_equal_the_reference():
    """``layers=(1, 3)``: layer 2 runs every token (the plan rejoins the selection of layer 1 by itself)."""
    model, inputs = built("llava", seed=1)
    for one in (llava_single(inputs, LLAVA_PROMPTS, i) for i in range(2)):
        out, st = wrapped(model, one, budget=0.5, layers=(1, 3))
        log = {}
        with torch.no_grad(), orthorank_layers(model, (1, 3), 0.5, one["attention_mask"], log=log):
            ref = model(**one).logits
        got = st.extra["orthorank"]["updated_indices"]
        assert sorted(got) == [1, 3]
        assert st.tokens_per_layer[2] == one["input_ids"].shape[1] > st.tokens_per_layer[1]
        for li in (1, 3):
            assert got[li][0] == log[li][0][0].nonzero().flatten().tolist(), li
        torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)


def test_skipped_tokens_carry_their_input_state():
    """Only the last layer runs a selection: what reaches the final norm on a skipped slot is exactly the
    plain model's state entering that layer; on a selected slot it is not. And layer by layer (from K=1):
    the state entering layer l+1 equals the one entering l wherever l was skipped."""
    model, inputs = built("llava")
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True).hidden_states[3]
    seen = {}
    norm = model.model.language_model.norm
    mmsink.wrap(model, **LAYERS, budget=0.4, layer=3)
    hook = norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0]))
    try:
        with torch.no_grad():
            model(**inputs)
        st = mmsink.stats(model)
    finally:
        hook.remove()
        mmsink.unwrap(model)
    valid = inputs["attention_mask"].bool()
    upd = torch.zeros_like(valid)
    for i, idx in enumerate(st.extra["orthorank"]["updated_indices"][3]):
        upd[i, idx] = True
    skipped = valid & ~upd
    assert skipped.any() and upd.any()
    assert torch.equal(seen["final"][skipped], plain[skipped])
    assert not torch.isclose(seen["final"][upd], plain[upd]).all(-1).any()

    handle_in = {}
    mmsink.wrap(model, **LAYERS, budget=0.4, layer=1)
    handle = get_handle(model)

    def post(li):
        def hook(module, args, output):
            carry = handle.ctx.carry  # the states every slot entered this layer with, and who skipped
            if carry is not None:
                handle_in[li] = (carry.hidden.clone(), carry.rest.gather, carry.rest.valid)

        return hook

    hooks = [blk.register_forward_hook(post(i)) for i, blk in enumerate(model.model.language_model.layers)]
    hooks.append(norm.register_forward_pre_hook(lambda m, a: handle_in.__setitem__(4, (a[0],))))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        mmsink.unwrap(model)
    assert sorted(handle_in) == [1, 2, 3, 4]
    for li in (1, 2, 3):
        h_in, rest, ok = handle_in[li]
        h_next = handle_in[li + 1][0]
        for b in range(h_in.shape[0]):
            slots = rest[b][ok[b]]
            assert len(slots) > 0  # sample 2 too: a prompt without images is selected from as well
            assert torch.equal(h_next[b, slots], h_in[b, slots])


def counted(model, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(**inputs)
    return fc.get_total_flops()


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_flops_match_counter(family):
    """Exact in the language model: the stats differ from the counter by what the plain model's do (the
    vision tower's own small offset, the same inputs), for the batch and for each sample run alone."""
    model, inputs = built(family, "eager")
    single = FAMILIES[family][2]
    st, got = counted_prefill(model, inputs, **LAYERS, budget=0.4, layer=1)
    assert st.prefill_flops - got == st.baseline_prefill_flops - counted(model, inputs)
    assert st.prefill_flops < 0.9 * st.baseline_prefill_flops
    plain = [counted(model, single(inputs, i)) for i in range(3)]
    mmsink.wrap(model, **LAYERS, budget=0.4, layer=1)
    try:
        alone = [counted(model, single(inputs, i)) for i in range(3)]
    finally:
        mmsink.unwrap(model)
    for i in range(3):
        offset = st.extra["sample_baseline_prefill_flops"][i] - plain[i]
        assert st.extra["sample_prefill_flops"][i] - alone[i] == offset, i
    assert alone[0] < plain[0] and alone[2] < plain[2]  # a prompt without images saves as well


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_per_sample_and_cached(family):
    model, inputs = built(family)
    single = FAMILIES[family][2]
    mmsink.wrap(model, **LAYERS, budget=0.5, layer=1)
    try:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
            st = mmsink.stats(model).extra["orthorank"]["updated_indices"]
            pad = (inputs["attention_mask"] == 0).sum(1).tolist()
            for i in range(3):
                one = model(**single(inputs, i)).logits[0, -1]
                torch.testing.assert_close(out[i], one, atol=1e-4, rtol=1e-4)
                s1 = mmsink.stats(model).extra["orthorank"]["updated_indices"]
                for li in range(1, 4):
                    assert [j - pad[i] for j in st[li][i]] == s1[li][0]
            a = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            b = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(a, b)


def test_bad_options():
    model, _ = built("llava")
    bad_ones = [
        {"form": "paper"},
        {"form": "layers", "budget": 5},
        {"layers": (1, 2)},
        {"form": "layers", "layers": (0, 2)},
        {"form": "layers", "layers": (1, 4)},
        {"form": "layers", "layers": 2},
    ]
    for bad in bad_ones:
        with pytest.raises(ValueError, match="orthorank"):
            mmsink.wrap(model, prune="orthorank", **bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_plain_cached_and_fast(dtype):
    """On CUDA (SDPA with a boolean mask for the selected queries, the cache rewritten in the layer,
    generate_fast's graphs): every token selected is the plain model; greedy tokens of generate_fast ==
    generate (== uncached in float32); a padded batch's last logits equal each sample's alone (float32)."""
    model = tiny_llava(layers=4).to("cuda", dtype)
    prompts = [prompt(5, 7, seed=1), prompt(2, 4, seed=2)]
    inputs = {k: v.cuda() for k, v in batch(prompts, seed=1).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        ref = model(**inputs).logits
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    real = inputs["attention_mask"].bool()  # padded rows attend nothing: any kernel's garbage
    mmsink.wrap(model, **LAYERS, budget=1.0, layer=1)
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits[real], ref[real], atol=tol, rtol=tol)
        mmsink.wrap(model, **LAYERS, budget=0.4, layer=1)
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
            if dtype == torch.float32:
                for i, p in enumerate(prompts):
                    one = {
                        "input_ids": torch.tensor([p], device="cuda"),
                        "attention_mask": torch.ones(1, len(p), dtype=torch.long, device="cuda"),
                        "pixel_values": inputs["pixel_values"][i : i + 1],
                    }
                    torch.testing.assert_close(model(**one).logits[0, -1], out[i], atol=1e-4, rtol=1e-4)
            a = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            c = mmsink.generate_fast(model, max_new_tokens=6, compile=False, **inputs)
            # a random model may generate the image token, which an uncached re-prefill cannot take
            # (the unwrapped model raises too): both sides of that check are kept off it
            no_image = {"max_new_tokens": 6, "do_sample": False, "bad_words_ids": [[IMAGE_TOKEN]]}
            a2 = model.generate(**inputs, **no_image)
            b = model.generate(**inputs, **no_image, use_cache=False)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(a, c)
    assert dtype != torch.float32 or torch.equal(a2, b)  # bf16: a re-prefill may round differently
