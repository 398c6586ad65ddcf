"""The vision-stage peers against plain ports of their official rules (``official_vision.py``,
``official.visionzip_official``), on tiny LLaVA models whose tower attends sharply (q/k scaled, so scores are
not near-ties), several seeds and two budgets: VisionZip (dvlab-research/VisionZip), SCOPE
(kinredon/SCOPE), VisPruner ICCV'25 (Theia-4869/VisPruner, ``vispruner_iccv``). Then, on every family:
batched == per sample (left padding, images of different sizes), cached == uncached greedy decoding,
executed FLOPs == ``FlopCounterMode``; ViT sinks keep their content under VisionZip."""

from functools import cache

import pytest
import torch
from official import visionzip_official
from official_vision import scope_official, vispruner_official
from tiny import (
    batch,
    batched_and_cached,
    counted_prefill,
    fast_and_generate,
    llava_single,
    next_batch,
    next_single,
    prompt,
    qwen_batch,
    qwen_single,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen,
)

import mmsink

P = 36  # patches per tiny LLaVA image


def sharpen(model, factor=3.0):
    """Trained-like tower: sharper attention than the random init (no near-ties in the [CLS] row)."""
    tower = model.model.vision_tower
    with torch.no_grad():
        for layer in getattr(tower, "vision_model", tower).encoder.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


@cache
def llava(seed: int):
    return sharpen(tiny_llava(layers=4, seed=seed).float())


def llava_inputs(seed: int):
    prompts = [prompt(5, 7, seed=seed), prompt(3, 4, seed=seed + 10, images=2)]
    return batch(prompts, seed=seed), prompts


def kept_patches(model, inputs, prompts, **settings) -> list:
    """Per image (input order), the patch indices mmsink keeps at the first layer."""
    mmsink.wrap(model, **settings)
    try:
        with torch.no_grad():
            model(**inputs)
        st = mmsink.stats(model)
    finally:
        mmsink.unwrap(model)
    out = []
    width = inputs["input_ids"].shape[1]
    for b, p in enumerate(prompts):
        pad = width - len(p)
        starts = [pad + j for j in range(len(p)) if p[j] == 100 and (j == 0 or p[j - 1] != 100)]
        kept = set(st.kept_indices[0][b])
        out += [sorted(k - s for k in kept if s <= k < s + P) for s in starts]
    return out


def official_slot_of_cls(kept_patch_set: set) -> int:
    """mmsink's documented slot for VisionZip's [CLS]: the image's first patch not otherwise kept."""
    return min(j for j in range(P) if j not in kept_patch_set)


SEEDS = [0, 1, 2, 3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("budget", [8, 20])
def test_visionzip_keeps_the_official_set(seed, budget):
    model = llava(seed)
    inputs, prompts = llava_inputs(seed)
    got = kept_patches(model, inputs, prompts, prune="visionzip", budget=budget)
    contextual = round(budget * 10 / 64)
    with torch.no_grad():
        want = visionzip_official(model, inputs["pixel_values"], budget - contextual, contextual)
    for g, (kept, _) in zip(got, want):
        patches = {i - 1 for i in kept if i > 0}  # the official tower indices: 0 is [CLS]
        assert 0 in kept and len(kept) == budget
        assert sorted(patches | {official_slot_of_cls(patches)}) == g


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("budget", [8, 20])
def test_visionzip_features_are_the_official_formula(seed, budget):
    """The projector receives, at each kept slot: a dominant patch as it is, ``target + mean(joined)`` at a
    target, [CLS] at its documented slot (the official code's features, one by one)."""
    model = llava(seed)
    inputs, prompts = llava_inputs(seed)
    seen = []
    mmsink.wrap(model, prune="visionzip", budget=budget)
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
        mmsink.unwrap(model)
    rows = seen[0]  # [images, P, F]: the features after VisionZip
    contextual = round(budget * 10 / 64)
    with torch.no_grad():
        want = visionzip_official(model, inputs["pixel_values"], budget - contextual, contextual)
    for i, (kept, feats) in enumerate(want):
        patches = {k - 1 for k in kept if k > 0}
        slot = {k: (k - 1 if k > 0 else official_slot_of_cls(patches)) for k in kept}
        for k, f in zip(kept, feats):
            torch.testing.assert_close(rows[i, slot[k]], f, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("budget", [6, 12])
def test_scope_keeps_the_official_set(seed, budget):
    model = llava(seed)
    inputs, prompts = llava_inputs(seed)
    got = kept_patches(model, inputs, prompts, prune="scope", budget=budget)
    with torch.no_grad():
        want = scope_official(model, inputs["pixel_values"], budget)
    assert got == want


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("budget", [16, 10])
def test_vispruner_keeps_the_official_set(seed, budget):
    """16: even leftovers every round, the official code runs as is. 10: T_imp = 5 leaves 31, an odd count
    the official code cannot split (pinned below); mmsink drops r of the larger half."""
    model = llava(seed)
    inputs, prompts = llava_inputs(seed)
    got = kept_patches(model, inputs, prompts, prune="vispruner_iccv", budget=budget)
    with torch.no_grad():
        want = vispruner_official(model, inputs["pixel_values"], budget)
        if budget == 10:
            with pytest.raises(RuntimeError):
                vispruner_official(model, inputs["pixel_values"], budget, odd="official")
        else:
            assert vispruner_official(model, inputs["pixel_values"], budget, odd="official") == want
    assert got == want


def test_vispruner_is_not_visipruner():
    from mmsink.pruners import REGISTRY

    assert {"vispruner_iccv", "visipruner", "scope"} <= set(mmsink.methods())
    assert "not VisiPruner" in REGISTRY["vispruner_iccv"].__doc__
    assert "Theia-4869/VisPruner" in REGISTRY["vispruner_iccv"].__doc__


# ------------------------------------------------------------------------------ ViT sinks under VisionZip


def projector_rows(model, inputs, **settings):
    """(the projector's input after mmsink's vision stage, layer 0's hidden states, stats)."""
    seen, grab = [], []
    mmsink.wrap(model, **settings)
    layer0 = model.model.language_model.layers[0]
    hooks = [  # registered after mmsink's own hooks: they see what mmsink hands on
        model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0])),
        layer0.register_forward_pre_hook(
            lambda m, a, k: grab.append(a[0] if a else k["hidden_states"]), with_kwargs=True
        ),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
        return seen[0], grab[0], mmsink.stats(model)
    finally:
        for h in hooks:
            h.remove()
        mmsink.unwrap(model)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("budget", [8, 13])
def test_protected_sinks_keep_their_content_under_visionzip(seed, budget):
    """The token of image 0 with the largest norm among those VisionZip overwrites (a merge target, or
    [CLS]'s slot), made a ViT sink (threshold just under its norm): every sink keeps its own embedding, is
    never merged into a target, and the image still gets its whole budget beside the sinks."""
    model = llava(seed)
    p0 = prompt(5, 7, seed=seed)
    inputs = batch([p0], seed=seed)  # one sample: layer 0's slots are its kept positions, in order
    start0 = p0.index(100)
    with torch.no_grad():
        raw = model.model.vision_tower(inputs["pixel_values"][:1], output_hidden_states=True)
        raw = raw.hidden_states[-2][0, 1:]  # image 0's projector input, untouched
        bare = model.model.multi_modal_projector(raw)  # and its embeddings
    rows, _, st = projector_rows(model, inputs, prune="visionzip", budget=budget)
    plain0 = [k - start0 for k in st.kept_indices[0][0] if start0 <= k < start0 + P]
    changed = [j for j in range(P) if not torch.equal(rows[0, j], raw[j])]
    assert changed and len(plain0) == budget
    norms = raw.norm(dim=-1)
    threshold = float(norms[max(changed, key=lambda j: norms[j])]) - 1e-4
    sinks = [j for j in range(P) if norms[j] > threshold]
    rows, hidden, st = projector_rows(
        model, inputs, prune="visionzip", budget=budget, sink_forward={"threshold": threshold, "max_sinks": P}
    )
    kept0 = st.kept_indices[0][0]
    assert sorted(s["patch"] for s in st.extra["vit_sinks"][0] if s["position"] < start0 + P) == sinks
    for j in sinks:
        assert torch.equal(rows[0, j], raw[j])  # its own features reach the projector
        slot = start0 + sum(k < start0 + j for k in kept0)  # layer 0's slots: the text, then kept tokens
        torch.testing.assert_close(hidden[0, slot], bare[j], atol=1e-5, rtol=1e-5)
    # merged into nothing: the image keeps its whole budget beside the sinks that are not dominant, and
    # the contextual tokens are the official formula over the rest without the sinks
    contextual = round(budget * 10 / 64)
    with torch.no_grad():
        ((kept, _),) = visionzip_official(model, inputs["pixel_values"][:1], budget - contextual, contextual)
        x = torch.nn.functional.normalize(keys_of(model, inputs["pixel_values"][:1])[0], dim=-1)
    dominant = {k - 1 for k in kept[1 : budget - contextual]}
    rest = [j for j in range(P) if j not in dominant and j not in sinks]
    assert len(rest) > contextual
    image0 = [k - start0 for k in kept0 if start0 <= k < start0 + P]
    assert len(image0) == budget + len(set(sinks) - dominant)
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    others = [j for j in rest if j not in targets]
    assign = (x[others] @ x[targets].T).argmax(1).tolist()
    for c, t in enumerate(targets):
        group = [o for o, a in zip(others, assign) if a == c]
        want = raw[t] + raw[group].sum(0) / max(1, len(group))
        torch.testing.assert_close(rows[0, t], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["visionzip", "scope", "vispruner_iccv"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sinks_kept_and_moved_with_their_keep_set(method, seed):
    """ViT sinks survive every vision-stage method; with ``to_front`` the same tokens (the same embeddings)
    reach the LLM, the sinks first: the keep set follows the tokens the first layer moves."""
    model = llava(seed)
    p0 = prompt(5, 7, seed=seed)
    inputs = batch([p0], seed=seed)
    start0 = p0.index(100)
    with torch.no_grad():
        raw = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    norms = raw.hidden_states[-2][0, 1:].norm(dim=-1)
    sinks = sorted(norms.topk(3).indices.tolist())
    cfg = {"threshold": float(norms.topk(3).values[-1]) - 1e-4, "max_sinks": 3}
    runs = {}
    for front in (False, True):
        _, hidden, st = projector_rows(
            model, inputs, prune=method, budget=6, sink_forward=dict(cfg, to_front=front)
        )
        kept = st.kept_indices[0][0]
        image = [i for i, k in enumerate(kept) if start0 <= k < start0 + P]
        runs[front] = (hidden[0, start0 : start0 + len(image)], [kept[i] - start0 for i in image], st)
    (plain, at, st), (moved, at_front, st_front) = runs[False], runs[True]
    assert set(sinks) <= set(at)
    assert at_front[:3] == [0, 1, 2] and len(at_front) == len(at)
    assert [s["patch"] for s in st_front.extra["vit_sinks"][0]] == sinks
    order = [at.index(j) for j in sinks] + [i for i, j in enumerate(at) if j not in sinks]
    torch.testing.assert_close(moved, plain[order], atol=1e-5, rtol=1e-5)


def keys_of(model, pixel_values):
    """[I, P, d] the feature layer's keys of the patches, mean over heads (VisionZip's metric)."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    blk = getattr(tower, "vision_model", tower).encoder.layers[-2]
    k = blk.self_attn.k_proj(blk.layer_norm1(out.hidden_states[-3]))
    return k.view(*k.shape[:2], blk.self_attn.num_heads, -1).mean(2)[:, 1:]


# ------------------------------------------------------------------------------ every family

METHODS = [
    ("visionzip", {"budget": 0.5}),
    ("scope", {"budget": 0.5}),
    ("vispruner_iccv", {"budget": 0.5}),
    ("scope", {"budget": 3}),
    ("vispruner_iccv", {"budget": 3}),
    ("visionzip", {"budget": 0.5, "sink_forward": {"factor": 1.01, "max_sinks": 2}}),
    ("scope", {"budget": 3, "sink_forward": {"factor": 1.01, "max_sinks": 2, "to_front": True}}),
]
NEXT_SPECS = [(4, 6, [(28, 56)]), (2, 3, [(56, 56), (28, 28)]), (3, 5, [])]
QWEN_SPECS = [(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)]), (3, 5, [])]
LLAVA_PROMPTS = [prompt(5, 7, seed=1), prompt(2, 4, seed=2, images=2), prompt(3, 5, seed=3, images=0)]


FAMILIES = {
    "llava": (
        lambda attn: sharpen(tiny_llava(layers=4, attn=attn)),
        lambda m: batch(LLAVA_PROMPTS, seed=4),
        lambda inputs, i: llava_single(inputs, LLAVA_PROMPTS, i),
    ),
    "llava_next": (
        lambda attn: tiny_llava_next(layers=4, attn=attn),
        lambda m: next_batch(m, NEXT_SPECS, seed=1)[0],
        lambda inputs, i: next_single(inputs, NEXT_SPECS, i),
    ),
    "qwen2_vl": (
        lambda attn: tiny_qwen("qwen2_vl", layers=4, attn=attn),
        lambda m: qwen_batch(QWEN_SPECS, seed=1)[0],
        lambda inputs, i: qwen_single(inputs, QWEN_SPECS, i),
    ),
    "qwen2_5_vl": (
        lambda attn: tiny_qwen("qwen2_5_vl", layers=4, attn=attn),
        lambda m: qwen_batch(QWEN_SPECS, seed=1)[0],
        lambda inputs, i: qwen_single(inputs, QWEN_SPECS, i),
    ),
}


@cache
def built(family: str, attn: str = "sdpa"):
    build, make, _ = FAMILIES[family]
    model = build(attn)
    return model, make(model)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
def test_batched_per_sample_and_cached(family, method, opts):
    model, inputs = built(family)
    single = FAMILIES[family][2]
    st, a, b = batched_and_cached(model, inputs, single, 3, 4, prune=method, **opts)
    assert torch.equal(a, b)
    assert min(st.kept_tokens[-1][:2]) < max(st.visual_tokens)  # it did prune


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method,opts", METHODS[:3], ids=[m for m, _ in METHODS[:3]])
def test_flops_match_counter(family, method, opts):
    model, inputs = built(family, "eager")
    st, counted = counted_prefill(model, inputs, prune=method, **opts)
    assert abs(st.prefill_flops - counted) <= 0.02 * counted, (st.prefill_flops, counted)


@pytest.mark.parametrize("method", ["scope", "vispruner_iccv"])
def test_fast_generate_equals_generate(method):
    model, inputs = built("llava")
    fast, ref = fast_and_generate(model, inputs, prune=method, budget=5)
    assert torch.equal(fast, ref)


# ------------------------------------------------------------------------------ LLaVA-NeXT, per tile


@cache
def next_model():
    """A tiny LLaVA-NeXT with 6x6-patch tiles (the tiles of ``tiny_llava_next`` have 4 tokens)."""
    from tiny import clip, finish, llama
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(
        vision_config=clip(84),
        text_config=LlamaConfig(**llama(2)),
        image_token_index=100,
        image_grid_pinpoints=[[84, 168], [168, 84], [168, 168]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return sharpen(finish(LlavaNextForConditionalGeneration(cfg), "sdpa").float())


@pytest.mark.parametrize("method", ["visionzip", "scope", "vispruner_iccv"])
@pytest.mark.parametrize("seed", [0, 1])
def test_next_tiles_keep_the_official_set(monkeypatch, method, seed):
    """Per tile (an image of 84x168 pixels: base + 2 crops, none unpadded), each tile keeps what the
    official rule keeps of that tile, with the image's budget shared by its 3 tiles (24 -> 8 each)."""
    from mmsink.pruners import REGISTRY

    model = next_model()
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(1, 5, 3, 84, 84, generator=g)
    sizes = torch.tensor([[84, 168]])
    with torch.no_grad():
        n = model.model.get_image_features(pixel_values=pix, image_sizes=sizes, return_dict=True)
    n = n.pooler_output[0].shape[0]
    ids = torch.tensor([[1, 5, 6] + [100] * n + [7, 8]])
    seen = []
    cls = REGISTRY[method]
    own = cls.select

    def spy(self, ctx, tokens):
        out = own(self, ctx, tokens)
        seen.append((out[1].clone(), tokens.present))
        return out

    monkeypatch.setattr(cls, "select", spy)
    mmsink.wrap(model, prune=method, budget=24)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pix, image_sizes=sizes)
    finally:
        mmsink.unwrap(model)
    keep, present = seen[0]
    assert keep.shape == (3, P) and bool(present.all())
    tiles = pix[0, :3]
    with torch.no_grad():
        if method == "visionzip":  # 8 = 7 dominant ([CLS] + 6 patches) + 1 contextual
            want = []
            for kept, _ in visionzip_official(model, tiles, 7, 1):
                patches = {k - 1 for k in kept if k > 0}
                want.append(sorted(patches | {official_slot_of_cls(patches)}))
        elif method == "scope":
            want = scope_official(model, tiles, 8)
        else:
            want = vispruner_official(model, tiles, 8)
    assert [keep[t].nonzero().squeeze(1).tolist() for t in range(3)] == want


@pytest.mark.parametrize("method", ["visionzip", "scope", "vispruner_iccv"])
def test_full_strategy_rows_hold_cls(method):
    """vision_feature_select_strategy "full": each image's 37 tokens start with [CLS]. VisionZip keeps it at
    its own slot (one of the dominant tokens); SCOPE and VisPruner choose among the patches only (their
    official code never feeds [CLS]); the budget counts the image's tokens either way."""
    model = tiny_llava(layers=2)
    model.config.vision_feature_select_strategy = "full"
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 5, 6] + [100] * (P + 1) + [7, 8]])
    pix = torch.randn(1, 3, 84, 84, generator=g)
    mmsink.wrap(model, prune=method, budget=8)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pix)
        kept = mmsink.stats(model).kept_indices[0][0]
    finally:
        mmsink.unwrap(model)
    assert len(kept) == 8
    assert (3 in kept) == (method == "visionzip")  # position 3: the [CLS] token
