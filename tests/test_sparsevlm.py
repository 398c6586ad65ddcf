"""SparseVLM keeps (and merges) what its official rule does (``official_sparsevlm.py``, a plain port run
eagerly on the full sequence of each sample alone), with trained-like weights (q/k scaled, RMSNorm weights
spread), several seeds, two budgets, full and grouped-query attention; batched (left padding, several
images a prompt) == per sample; cached == uncached; executed FLOPs == FlopCounterMode; every family;
ViT-sink tokens kept."""

import pytest
import torch
from official_sparsevlm import PRUNING_LOC, SCHEDULES, cluster_and_merge_official, sparsevlm_official
from test_families import FAMILIES, built
from test_official import KV, SEEDS, model_for, prompts
from test_var import VAR
from tiny import batch, batched_and_cached, counted_prefill, llava_single, prompt, tiny_llava

import mmsink
from mmsink.pruners.sparsevlm import cluster_and_merge, default_layers, stage_tokens


def run(model, inputs, hook_layer=None, **settings):
    """(kept_indices [layer][sample] as each sample's own positions, stats, the states entering
    ``hook_layer`` [B, n, D] as mmsink hands them to that layer)."""
    seen = []
    mmsink.wrap(model, **settings)
    h = None
    if hook_layer is not None:  # registered after mmsink's own pre-hook: sees the gathered states
        layer = model.model.language_model.layers[hook_layer]
        h = layer.register_forward_pre_hook(lambda mod, a, k: seen.append(a[0].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
        st = mmsink.stats(model)
    finally:
        if h is not None:
            h.remove()
        mmsink.unwrap(model)
    pad = (inputs["attention_mask"] == 0).sum(1).tolist()
    kept = [[[j - pad[i] for j in layer[i]] for i in range(len(pad))] for layer in st.kept_indices]
    return kept, st, (seen[0] if seen else None)


def test_schedules_and_layers_are_the_official_ones():
    """A 576-token image at the official budgets gets the official lists (int or fraction budgets), a
    32-layer model the official layers; other budgets interpolate between them."""
    for b, sched in SCHEDULES.items():
        assert stage_tokens(b, 576) == sched
        assert stage_tokens(b / 576, 576) == sched
        assert stage_tokens(b * 5, 576 * 5) == tuple(5 * s for s in sched)
    assert default_layers(32) == PRUNING_LOC
    assert default_layers(28) == (2, 5, 13) and default_layers(40) == (3, 8, 19)
    assert default_layers(8) == (1, 2, 4)
    mid = stage_tokens(160, 576)  # half way between 128 and 192
    assert mid == tuple(int((a + c) / 2 + 0.5) for a, c in zip(SCHEDULES[128], SCHEDULES[192]))


@pytest.mark.parametrize("seed", SEEDS)
def test_batched_clustering_is_the_official_one(seed):
    """Groups of different sizes and cluster counts, padded into one batch: each group's clusters (centres
    and means) are the official ones on that group alone."""
    g = torch.Generator().manual_seed(seed)
    sizes, clusters, width, dim = [25, 40, 13, 1], [3, 5, 2, 1], 40, 16
    x = torch.randn(len(sizes), width, dim, generator=g) * (1 + torch.rand(len(sizes), width, 1, generator=g))
    valid = torch.arange(width)[None] < torch.tensor(sizes)[:, None]
    merged, centre, ok = cluster_and_merge(x, valid, torch.tensor(clusters))
    for i, (n, c) in enumerate(zip(sizes, clusters)):
        ref, ref_centres = cluster_and_merge_official(x[i, :n], c)
        assert ok[i].sum().item() == c
        assert centre[i, :c].tolist() == ref_centres.tolist()
        torch.testing.assert_close(merged[i, :c], ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("budget", [12, 8, 4])  # 192, 128 and 64 of 576 (64: two clusters), 36 tokens
def test_matches_official(seed, kv, budget):
    """Decision 1: the official code's kept set and merged-token hosts exactly (re-indexed positions or
    not). Every decision: the official rule with mmsink's original positions (merged tokens at their
    centres' positions), left-padded batch against each sample alone."""
    model = model_for(seed, kv)
    ps = prompts(seed)
    inputs = batch(ps, seed=seed)
    layers = default_layers(8)
    tokens = stage_tokens(budget, 36)
    kept, _, _ = run(model, inputs, prune="sparsevlm", budget=budget)
    for i, p in enumerate(ps):
        ids, pix = torch.tensor(p), inputs["pixel_values"][i : i + 1]
        with torch.no_grad():
            official = sparsevlm_official(model, ids, pix, layers, tokens, positions="reindex")
            original = sparsevlm_official(model, ids, pix, layers, tokens, positions="original")
        assert kept[layers[0] + 1][i] == official[0]["kept"] == original[0]["kept"]
        assert [kept[layer + 1][i] for layer in layers] == [s["kept"] for s in original]
        assert kept[layers[0]][i] == list(range(p.index(100), p.index(100) + 36))  # before: everything


@pytest.mark.parametrize("budget", [12, 4])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_merged_states_are_the_official_clusters(seed, budget):
    """The states a merged token carries into the next layer are the official cluster means (from the
    layer's output), at the slots of their centres; recycle=False keeps the official topk alone."""
    model = model_for(seed, 2)
    p = prompt(5, 9, seed=seed)
    inputs = batch([p], seed=seed)
    layers = default_layers(8)
    tokens = stage_tokens(budget, 36)
    kept, _, seen = run(model, inputs, hook_layer=layers[0] + 1, prune="sparsevlm", budget=budget)
    with torch.no_grad():
        official = sparsevlm_official(model, torch.tensor(p), inputs["pixel_values"], layers, tokens)
        plain = sparsevlm_official(model, torch.tensor(p), inputs["pixel_values"], layers, tokens, False)
    first = p.index(100)
    alive = sorted(set(range(len(p))) - set(range(first, first + 36)) | set(kept[layers[0] + 1][0]))
    merged = official[0]["merged"]
    assert merged and set(merged) <= set(kept[layers[0] + 1][0])
    for pos, state in merged.items():
        torch.testing.assert_close(seen[0, alive.index(pos)], state, atol=1e-5, rtol=1e-5)
    assert len(merged) == (1 if budget == 12 else 2)
    kept_plain, _, _ = run(model, inputs, prune="sparsevlm", budget=budget, recycle=False)
    assert kept_plain[layers[0] + 1][0] == plain[0]["kept"]
    assert len(plain[0]["kept"]) == tokens[0] < len(official[0]["kept"])


def test_positions_differ_from_official_only_after_the_first_decision():
    """Pins the one deliberate departure: positions (original ones kept; merged tokens at their centres'
    slots instead of after the kept tokens with re-indexed positions). Somewhere here the re-indexed
    rule keeps another set at a later decision; the first decision never differs."""
    differ = 0
    layers, tokens = default_layers(8), stage_tokens(8, 36)
    for seed in SEEDS:
        model = model_for(seed, 4)
        for p in prompts(seed):
            pix = batch([p], seed=seed)["pixel_values"]
            with torch.no_grad():
                a = sparsevlm_official(model, torch.tensor(p), pix, layers, tokens, positions="reindex")
                b = sparsevlm_official(model, torch.tensor(p), pix, layers, tokens, positions="original")
            assert a[0]["kept"] == b[0]["kept"]
            differ += [s["kept"] for s in a] != [s["kept"] for s in b]
    assert differ > 0


LLAVA_PROMPTS = [prompt(5, 7, seed=1), prompt(2, 4, seed=2, images=2), prompt(3, 9, seed=3)]


@pytest.mark.parametrize(
    "opts", [{"budget": 12}, {"budget": 0.25, "recycle": False}, {"budget": 20, "budget_per": "prompt"}]
)
def test_batched_per_sample_and_cached(opts):
    model = model_for(0, 2)
    inputs = batch(LLAVA_PROMPTS, seed=4)
    mmsink.wrap(model, prune="sparsevlm", **opts)
    try:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
            st = mmsink.stats(model)
            for i, p in enumerate(LLAVA_PROMPTS):
                one = llava_single(inputs, LLAVA_PROMPTS, i)
                torch.testing.assert_close(out[i], model(**one).logits[0, -1], atol=1e-4, rtol=1e-4)
                pad = inputs["input_ids"].shape[1] - len(p)
                alone = mmsink.stats(model).kept_indices
                assert [[j - pad for j in layer[i]] for layer in st.kept_indices] == [x[0] for x in alone]
            a = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            b = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(a, b)
    assert max(st.kept_tokens[-1]) < min(st.visual_tokens)


def test_flops_match_counter():
    model = tiny_llava(layers=8, attn="eager")
    inputs = batch(LLAVA_PROMPTS, seed=4)
    for opts in ({"budget": 12}, {"budget": 8, "recycle": False}):
        st, counted = counted_prefill(model, inputs, prune="sparsevlm", **opts)
        assert abs(st.prefill_flops - counted) <= 0.02 * counted, (st.prefill_flops, counted)
        assert st.prefill_flops < 0.8 * st.baseline_prefill_flops


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_batched_cached_and_flops(family):
    fam = FAMILIES[family]
    model, inputs = built(family)
    single, n = fam["single"], fam["samples"]
    st, a, b = batched_and_cached(model, inputs, single, n, 5, prune="sparsevlm", budget=0.3)
    assert torch.equal(a, b)
    assert min(st.kept_tokens[-1][:2]) < max(st.visual_tokens)
    model, inputs = built(family, "eager")
    st, counted = counted_prefill(model, inputs, prune="sparsevlm", budget=0.3)
    assert abs(st.prefill_flops - counted) <= 0.02 * counted, (st.prefill_flops, counted)


def test_vit_sinks_kept_and_not_merged():
    """Protected tokens stay at every layer and keep their own states (never a merge host)."""
    model = tiny_llava(layers=8)
    p = prompt(5, 7, seed=1)
    inputs = batch([p], seed=1)
    sinks = {"factor": 1.01, "max_sinks": 3}
    layers = default_layers(8)
    kept, st, seen = run(
        model, inputs, hook_layer=layers[0] + 1, prune="sparsevlm", budget=4, sink_forward=sinks
    )
    expected = sorted(s["position"] for s in st.extra["vit_sinks"][0])
    assert len(expected) == 3
    for layer in kept:
        assert set(expected) <= set(layer[0])
    plain, _, seen_plain = run(model, inputs, hook_layer=layers[0] + 1, prune="sparsevlm", budget=4)
    assert not set(expected) <= set(plain[layers[-1] + 1][0])  # they would have gone
    first = p.index(100)
    alive = sorted(set(range(len(p))) - set(range(first, first + 36)) | set(kept[layers[0] + 1][0]))
    model_out = []
    h = model.model.language_model.layers[layers[0]].register_forward_hook(
        lambda m, a, o: model_out.append((o[0] if isinstance(o, tuple) else o).clone())
    )
    try:
        run(model, inputs, prune="sparsevlm", budget=4, sink_forward=sinks)
    finally:
        h.remove()
    for pos in expected:  # the layer's own output, not a cluster mean
        torch.testing.assert_close(seen[0, alive.index(pos)], model_out[0][0, pos])


def test_options_checked():
    with pytest.raises(ValueError, match="layers"):
        mmsink.wrap(tiny_llava(layers=8), prune="sparsevlm", layers=(3, 2, 5))
    with pytest.raises(ValueError, match="recycle"):
        mmsink.wrap(tiny_llava(layers=8), prune="sparsevlm", recycle="yes")
    with pytest.raises(ValueError, match="layer after"):
        mmsink.wrap(tiny_llava(layers=8), prune="sparsevlm", layers=(1, 3, 7))
    with pytest.raises(ValueError, match="at least 6"):
        mmsink.wrap(tiny_llava(layers=4), prune="sparsevlm")


def test_generate_fast_same_tokens_and_hand_off(monkeypatch):
    """generate_fast hands off after the last decision (merged states included) and gives generate's
    greedy tokens and plan."""
    from mmsink.fast import decode as fastmod

    calls = []
    real = fastmod.FastDecoder.tail
    monkeypatch.setattr(fastmod.FastDecoder, "tail", lambda self, *a: calls.append(a[0]) or real(self, *a))
    model = model_for(1, 2)
    inputs = batch(LLAVA_PROMPTS, seed=4)
    mmsink.wrap(model, prune="sparsevlm", budget=8)
    try:
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        want = mmsink.stats(model)
        out = mmsink.generate_fast(model, max_new_tokens=6, **inputs)
        got = mmsink.stats(model)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(out, ref)
    assert calls == [default_layers(8)[-1] + 1]
    assert got.kept_indices == want.kept_indices


def test_only_the_raters_rows_are_scored(monkeypatch):
    """The decision layers hand over the raters' query rows only (one per rater, none else), and the
    raters are the official ones (the kept sets above depend on them)."""
    from mmsink.pruners.sparsevlm import SparseVLM

    widths = []
    real = SparseVLM.scores
    monkeypatch.setattr(
        SparseVLM, "scores", lambda self, ctx, o: widths.append(o["q_rows"].shape[2]) or real(self, ctx, o)
    )
    model = model_for(0, 2)
    ps = prompts(0)
    inputs = batch(ps, seed=0)
    run(model, inputs, prune="sparsevlm", budget=12)
    from reference import embed

    counts = []
    for i, p in enumerate(ps):
        x = embed(model, torch.tensor(p)[None], inputs["pixel_values"][i : i + 1])[0]
        first = p.index(100)
        m = (x[first : first + 36] @ x[first + 36 :].T).softmax(1).mean(0)
        counts.append(int((m > m.mean()).sum()))
    assert widths == [max(counts)] * 3
    assert max(counts) < max(len(p) - p.index(100) - 36 for p in ps)  # fewer than the text rows


def test_with_var():
    """VAR at the decision layers: SparseVLM ranks by the layer's plain softmax; the pair runs, batched ==
    per sample."""
    model = model_for(0, 2)
    inputs = batch(LLAVA_PROMPTS, seed=4)
    mmsink.wrap(model, prune="sparsevlm", budget=12, var=VAR)
    try:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
            p = LLAVA_PROMPTS[0]
            one = {
                "input_ids": torch.tensor([p]),
                "attention_mask": torch.ones(1, len(p), dtype=torch.long),
                "pixel_values": inputs["pixel_values"][:1],
            }
            torch.testing.assert_close(out[0], model(**one).logits[0, -1], atol=1e-4, rtol=1e-4)
    finally:
        mmsink.unwrap(model)


@pytest.mark.parametrize(
    "opts", [{"budget": 12}, {"budget": 0.2}, {"budget": 20, "budget_per": "prompt"}, {"recycle": False}]
)
def test_device_reads_and_host_counts(monkeypatch, opts):
    """A prefill reads the device twice (the layout's read; the most raters a sample has, with layer 0's
    plan); each decision's counts (kept + merged) are known on the host and equal the keep mask's."""
    from test_reads import spy_repack

    from mmsink.tools.reads import DeviceReads

    seen = spy_repack(monkeypatch)
    model = model_for(0, 2)
    inputs = batch(LLAVA_PROMPTS, seed=4)
    mmsink.wrap(model, prune="sparsevlm", **opts)
    try:
        with torch.no_grad(), DeviceReads() as r:
            model(**inputs)
    finally:
        mmsink.unwrap(model)
    ours = {s: c for s, c in r.sites.items() if "/mmsink/" in s and "/transformers/" not in s}
    assert sum(ours.values()) == 2, ours
    assert len(seen) == 3
    for widths, actual in seen:
        assert widths is not None and tuple(widths) == actual
