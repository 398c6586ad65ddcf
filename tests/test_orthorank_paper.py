"""The plain reference of OrthoRank's own form (``orthorank_paper.py``): with every token selected it is
the plain model; tokens that skip a layer leave it exactly as they entered while the selected ones are
updated; the selected sets follow the score; padding does not change a sample's result."""

import torch
import torch.nn.functional as F
from orthorank_paper import orthorank_layers
from tiny import batch, prompt, tiny_llava

PROMPTS = [prompt(5, 7, seed=1), prompt(2, 4, seed=2)]


def run(model, inputs, layers, ratio, log=None):
    with torch.no_grad(), orthorank_layers(model, layers, ratio, inputs["attention_mask"], log=log):
        return model(**inputs, output_hidden_states=True)


def test_all_selected_is_the_plain_model():
    model = tiny_llava(layers=4)
    inputs = batch(PROMPTS, seed=1)
    with torch.no_grad():
        ref = model(**inputs).logits
    torch.testing.assert_close(run(model, inputs, range(1, 4), 1.0).logits, ref, atol=1e-5, rtol=1e-5)


def test_skipped_tokens_carry_their_input_and_selected_follow_the_score():
    model = tiny_llava(layers=4)
    inputs = batch(PROMPTS, seed=1)
    log = {}
    out = run(model, inputs, [2], 0.6, log)
    chosen, h_in = log[2]
    h_out = out.hidden_states[3]  # the states leaving layer 2
    valid = inputs["attention_mask"].bool()
    skipped = valid & ~chosen
    assert skipped.any() and (chosen & valid).any()
    assert torch.equal(h_out[skipped], h_in[skipped])
    assert not torch.isclose(h_out[chosen], h_in[chosen]).all(-1).any()
    x = model.model.language_model.layers[2].input_layernorm(h_in).float()
    for i in range(2):
        real = valid[i].nonzero().flatten()
        s = 1 - F.cosine_similarity(x[i, real], x[i, real[0]][None], dim=-1).abs()
        last = real[-1]
        picked = chosen[i, real] & (real != last)
        others = ~chosen[i, real]
        assert s[picked].min() >= s[others].max()  # every selected token scores at least any skipped one


def test_padding_does_not_change_a_sample():
    model = tiny_llava(layers=4)
    inputs = batch(PROMPTS, seed=1)
    out = run(model, inputs, range(1, 4), 0.5).logits[:, -1]
    for i, p in enumerate(PROMPTS):
        pix = inputs["pixel_values"][i : i + 1]
        one = {"input_ids": torch.tensor([p]), "attention_mask": torch.ones(1, len(p), dtype=torch.long)}
        got = run(model, {**one, "pixel_values": pix}, range(1, 4), 0.5).logits[0, -1]
        torch.testing.assert_close(out[i], got, atol=1e-4, rtol=1e-4)
