"""evals/sink_criteria on a tiny random LLaVA: each number equals a plain eager computation from the
unwrapped model's own outputs (output_attentions / output_hidden_states), and criteria pass only where the
fixture puts the phenomenon in (one scaled tower token, one large channel of one image token)."""

import pytest
import torch
from mmsink.evals import sink_criteria as sc
from mmsink.patches import family_for
from tiny import IMAGE_TOKEN, batch, prompt, tiny_llava

DIM, TAU = 5, 6.0  # phi = |h_d| / RMS(h) <= sqrt(hidden) = 8 here: VAR's 20 cannot be reached at this width
MASSIVE = f"massive activations (VAR, tau {TAU:g})"


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=4, attn="eager")


def inputs(seed):
    return batch([prompt(3, 6, seed=seed)], seed=seed)


def eager(model, x):
    """Plain reference numbers from the model's own outputs."""
    with torch.no_grad():
        out = model(**x, output_attentions=True, output_hidden_states=True)
        tower = model.model.vision_tower(x["pixel_values"], output_hidden_states=True).hidden_states
    ids = x["input_ids"][0]
    img = ids == IMAGE_TOKEN
    after = ~img & (img.cumsum(0) > 0)
    layers = []
    for i, att in enumerate(out.attentions):
        a, h = att[0], out.hidden_states[i][0]  # hidden_states[i]: what layer i reads
        ratio = h.abs() / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        layers.append(
            {
                "first_token": a[:, after, 0].mean().item(),
                "head_sink_rate": (a[:, :, 0].mean(-1) > 0.3).float().mean().item(),
                "phi": ratio.max().item(),
                "visual_sinks": int((ratio[img][:, DIM] > TAU).sum()),
            }
        )

    def vit(hs):
        n = hs[0, 1:].norm(dim=-1)  # patch tokens (select strategy "default")
        return {"sinks": int((n > 3 * n.median()).sum()), "ratio": (n.max() / n.median()).item()}

    return layers, vit(tower[model.config.vision_feature_layer]), vit(tower[-1])


def check(model, x):
    (got,) = sc.measure(model, x, family_for(model), [DIM], TAU)
    layers, feat, last = eager(model, x)
    for g, e in zip(got["layers"], layers, strict=True):
        for k in ("first_token", "head_sink_rate", "phi"):
            assert g[k] == pytest.approx(e[k], rel=1e-4, abs=1e-6), k
        assert g["visual_sinks"] == e["visual_sinks"]
    for g, e in ((got["vit_feature"], feat), (got["vit_last"], last)):
        assert g["sinks"] == e["sinks"]
        assert g["ratio"] == pytest.approx(e["ratio"], rel=1e-5)
    return got


def rows(model, seeds):
    per = [check(model, inputs(s)) for s in seeds]
    facts = {"tau": TAU, **sc.aggregate(per)}
    return facts, {r["criterion"]: r for r in sc.verdicts(facts, len(model.model.language_model.layers))}


def test_numbers_equal_eager_and_nothing_passes_on_a_random_model(model):
    facts, got = rows(model, [0, 1])
    assert all(r["layer"] == i for i, r in enumerate(facts["layers"]))
    assert facts["layers"][0]["phi_max"] < TAU  # a random model: no massive activation ...
    assert not got[MASSIVE]["pass"]
    assert not got["ViT high-norm tokens (vision_feature_layer)"]["pass"]  # ... and no high-norm token
    assert "test accuracy" not in got  # no accuracy facts given: no accuracy rows


def test_a_scaled_tower_token_and_a_large_channel_make_their_criteria_pass(model):
    feature_block = model.model.vision_tower.encoder.layers[model.config.vision_feature_layer]

    def scale(module, args, out):  # one patch token of the layer LLaVA reads, 10x its norm
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[:, 7] *= 10.0
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def channel(module, args, out):  # a large channel on one image token, from layer 1 on
        h = out.clone()
        h[:, 10, DIM] += 1000.0  # position 10: inside the image (3 system tokens + BOS, then 36)
        return h

    # prepend: before transformers' own output recorders, so output_hidden_states sees the edit too
    hooks = [
        feature_block.register_forward_hook(scale, prepend=True),
        model.model.language_model.layers[0].register_forward_hook(channel, prepend=True),
    ]
    try:
        facts, got = rows(model, [0, 1])
    finally:
        for h in hooks:
            h.remove()
    assert got["ViT high-norm tokens (vision_feature_layer)"]["pass"]
    assert facts["vit"]["vit_feature"]["share"] == 1.0
    shares = [r["visual_sink_share"] for r in facts["layers"]]
    assert shares == [0.0, 1.0, 1.0, 1.0]  # layer 0 reads the embeddings, before the planted channel
    assert got[MASSIVE]["pass"]


def test_accuracy_rows_from_the_runs_numbers(model):
    facts, _ = rows(model, [0])
    for random_acc, keep_ok in ((0.6, False), (0.85, True)):
        facts["accuracy"] = {
            "budget": 0.33,
            "full": {"accuracy": 0.95},
            "noise": {"accuracy": 0.30},
            "random": {"accuracy": random_acc},
            "blind_rate": 0.28,
        }
        got = {r["criterion"]: r for r in sc.verdicts(facts, 4)}
        assert got["test accuracy"]["pass"] and got["noise-image accuracy"]["pass"]
        assert got["random pruning to 0.33 keeps"]["pass"] is keep_ok


def test_a_batch_equals_each_prompt_alone_and_collect(model):
    from mmsink.tools.diagnose import collect

    fam = family_for(model)
    alone = [inputs(s) for s in (0, 1, 2)]  # equal lengths: one unpadded batch
    batches = sc.by_length(alone, 2)
    assert [idx for idx, _ in batches] == [[0, 1], [2]]
    got = sc.measure(model, batches[0][1], fam, [DIM], TAU)
    for x, g in zip(alone[:2], got, strict=True):
        (one,) = sc.measure(model, x, fam, [DIM], TAU)
        for a, b in zip(g["layers"], one["layers"], strict=True):
            assert a["first_token"] == pytest.approx(b["first_token"], rel=1e-4, abs=1e-6)
            assert a["phi"] == pytest.approx(b["phi"], rel=1e-4)
        assert g["vit_feature"]["ratio"] == pytest.approx(one["vit_feature"]["ratio"], rel=1e-5)
    ref = collect(model, alone[1], fam)  # mmsink inspect's own, sample by sample
    mine = sc.collect_batch(model, batches[0][1], fam)
    for p, q in zip(mine["probs"], ref["probs"], strict=True):
        torch.testing.assert_close(p[1], q, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mine["vit"][1].norm(dim=-1), ref["vit_norms"][0], rtol=1e-5, atol=1e-5)


def test_subset_takes_whole_images_in_order():
    from mmsink.evals.vqa import Bench

    qs = [{"qid": f"{i}_{j}", "image": f"{i}.png"} for i in range(4) for j in range(3)]
    b, firsts = sc.subset(Bench("b", qs, None, None), 2, per_image=2)
    assert [q["qid"] for q in b.questions] == ["0_0", "0_1", "1_0", "1_1"]
    assert [q["qid"] for q in firsts] == ["0_0", "1_0"]
    with pytest.raises(ValueError, match="fewer than 5"):
        sc.subset(Bench("b", qs, None, None), 5)
