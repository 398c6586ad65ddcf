"""LLaVA-NeXT specifics: per-image budgets on images of different sizes, the eager reference, pooling
per grid, VisionZip per tile, VAR (the shared contract: test_families.py)."""

import types

import pytest
import torch
from reference import run
from tiny import next_batch, next_single, prefill_stats, tiny_llava_next

import mmsink

SPECS = [(4, 6, [(28, 56)]), (2, 3, [(56, 56), (28, 28)]), (3, 5, [])]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def data(model):
    return next_batch(model, SPECS, seed=1)


def test_per_image_budget_on_images_of_different_sizes(model, data):
    inputs, prompts = data
    mmsink.wrap(model, prune="fastv", budget=0.25)
    with torch.no_grad():
        model(**inputs)
    st = mmsink.stats(model)
    mmsink.unwrap(model)
    assert st.visual_tokens == [p.count(100) for p in prompts]
    # sample 1 holds two images of different token counts: each keeps a quarter of its own
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"][1:3], image_sizes=inputs["image_sizes"][1:3], return_dict=True
        ).pooler_output
    first, second = (f.shape[0] for f in feats)
    assert first != second
    assert st.kept_tokens[-1][1] == -(-first // 4) + -(-second // 4)


def test_matches_reference(model, data):
    inputs, _ = data
    single = next_single(inputs, SPECS, 0)
    with torch.no_grad():
        ref, kept = run(
            model,
            single["input_ids"][0],
            single["pixel_values"],
            "fastv",
            budget=6,
            k=2,
            num_layers=8,
            image_sizes=single["image_sizes"],
        )
        mmsink.wrap(model, prune="fastv", budget=6)
        out = model(**single).logits[0, -1]
        st = mmsink.stats(model)
        mmsink.unwrap(model)
    assert [row[0] for row in st.kept_indices] == kept
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)


def test_pool_pools_each_grid_and_drops_newlines(model):
    """pool on NeXT: the base tile's grid and the unpadded crop grid (found here from the model's own
    embeddings: rows end at the image_newline vector) are pooled on their own, the budget shared by their
    cells; pooled tokens sit at their window centres; newline tokens are dropped."""
    from mmsink.pruners.simple import pool_grid

    inputs, _ = next_batch(model, [(3, 4, [(56, 56)])], seed=2)
    lm = model.model.language_model
    seen = {}

    def keep(name, value):
        seen[name] = value  # returns None: the hook changes nothing

    grab = lm.register_forward_pre_hook(
        lambda m, a, kw: keep("embeds", kw["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        grab.remove()
    embeds = seen["embeds"][0]
    run = (inputs["input_ids"][0] == 100).nonzero().squeeze(1)
    newline = (embeds[run] == model.model.image_newline.to(embeds.dtype)).all(-1)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    base = run[: side * side].view(side, side)
    crops = run[side * side :].view(int(newline.sum()), -1)[:, :-1]  # rows, each closed by a newline
    assert newline[side * side :].view(crops.shape[0], -1)[:, -1].all()
    k = -(-len(run) // 4)  # budget 0.25
    cells = base.numel() + crops.numel()
    expected = {}
    for grid in (base, crops):
        gr, gc = pool_grid(*grid.shape, max(1, round(k * grid.numel() / cells)))
        x = embeds[grid].permute(2, 0, 1)[None].float()
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, (gr, gc))[0].flatten(1).T
        r = ((torch.arange(gr) + 0.5) * grid.shape[0] / gr).long()
        c = ((torch.arange(gc) + 0.5) * grid.shape[1] / gc).long()
        for pos, vec in zip(grid[r[:, None], c[None]].flatten().tolist(), pooled):
            expected[pos] = vec
    mmsink.wrap(model, prune="pool", budget=0.25)
    layer0 = lm.layers[0].register_forward_pre_hook(
        lambda m, a, kw: keep("hidden", a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
        st = mmsink.stats(model)
    finally:
        layer0.remove()
        mmsink.unwrap(model)
    kept = st.kept_indices[0][0]
    assert sorted(kept) == sorted(expected)
    hidden = seen["hidden"][0]
    assert hidden.shape[0] == inputs["input_ids"].shape[1] - len(run) + len(kept)
    text_before = int(run[0])  # text tokens before the image keep their slots; pooled tokens follow in order
    for j, pos in enumerate(sorted(kept)):
        torch.testing.assert_close(
            hidden[text_before + j], expected[pos].to(hidden.dtype), atol=1e-5, rtol=1e-5
        )


def where_tokens_land(model, inputs, tile, token, scale=40.0):
    """Index among the batch's visual tokens (sequence order) of the projector-input row (tile, token),
    found independently of mmsink's map: scale that row and see which packed image feature changes."""

    def bump(module, args):
        x = args[0].clone()
        x[tile, token] *= scale
        return (x, *args[1:])

    feats = []
    for hook in (None, bump):
        h = model.model.multi_modal_projector.register_forward_pre_hook(hook) if hook else None
        try:
            with torch.no_grad():
                out = model.model.get_image_features(
                    pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
                )
        finally:
            if h:
                h.remove()
        feats.append(torch.cat(list(out.pooler_output)))
    changed = ((feats[0] - feats[1]).abs().amax(-1) > 0).nonzero().squeeze(1).tolist()
    assert len(changed) <= 1
    return changed[0] if changed else None  # None: unpadding dropped the token


def test_vit_sink_lands_where_the_model_puts_its_token(model, data):
    """A high-norm tower token of a crop tile is flagged and protected at its own sequence position."""
    inputs, _ = data
    tile, token = 2, 3  # a crop tile of sample 1's first image (tile 1 is its base image)
    sample, pos = (
        (inputs["input_ids"] == 100).nonzero()[where_tokens_land(model, inputs, tile, token)].tolist()
    )

    def bump(module, args):
        x = args[0].clone()
        x[tile, token] *= 40.0
        return (x, *args[1:])

    h = model.model.multi_modal_projector.register_forward_pre_hook(bump)  # runs before mmsink's hook
    try:
        st = prefill_stats(
            model, inputs, prune="fastv", budget=3, sink_forward={"factor": 3.0, "max_sinks": 1}
        )
    finally:
        h.remove()
    assert [s["position"] for s in st.extra["vit_sinks"][sample]] == [pos]
    assert all(pos in layer[sample] for layer in st.kept_indices)  # protected at every layer


def test_visionzip_keeps_each_tiles_top_cls_tokens(model, data):
    """VisionZip per tile: each tile's top dominant - 1 tokens by [CLS] attention (the tower's eager weights;
    the tile's [CLS] is the other dominant token, as dvlab-research/VisionZip) are kept
    at the sequence positions the model's own packing gives them; newline tokens are dropped."""
    inputs, _ = data
    tower = model.model.vision_tower
    counts = mmsink.patches.family_for(model).tiles(inputs["pixel_values"], inputs)
    pix = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], counts)])
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = tower(pix, output_attentions=True).attentions[model.config.vision_feature_layer]
    finally:
        tower.set_attn_implementation("sdpa")
    cls = att[:, :, 0, 1:].mean(1)  # [tiles, tokens per tile]
    st = prefill_stats(model, inputs, prune="visionzip", budget=0.5)
    flat = (inputs["input_ids"] == 100).nonzero()
    tiles, per = cls.shape
    landed = {(t, k): where_tokens_land(model, inputs, t, k) for t in range(tiles) for k in range(per)}
    expected = 0
    for tile in range(tiles):
        here = [k for k in range(per) if landed[tile, k] is not None]  # unpadding drops some crop tokens
        total = -(-len(here) // 2)
        dominant = total - min(round(total * 10 / 64), total - 1)
        expected += total  # the tile's [CLS] takes one slot: it is one of the dominant tokens
        for i in cls[tile, here].topk(dominant - 1).indices.tolist():
            sample, pos = flat[landed[tile, here[i]]].tolist()
            assert pos in st.kept_indices[0][sample]
    newlines = set(range(len(flat))) - set(landed.values())
    assert newlines  # the tiny model's crops do produce newline tokens
    for j in newlines:
        sample, pos = flat[j].tolist()
        assert pos not in st.kept_indices[0][sample]
    assert sum(len(st.kept_indices[0][b]) for b in range(len(SPECS))) == expected  # each tile its share


def test_var_and_pruning(model, data):
    inputs, _ = data
    var = {"sink_dims": (3, 17, 40, 51), "tau": 2.4}
    with torch.no_grad():
        mmsink.wrap(model, prune="fastv", budget=6)
        plain = model(**inputs).logits[:, -1]
        mmsink.wrap(model, prune="fastv", budget=6, var=var)
        try:
            out = model(**inputs).logits[:, -1]
            for i in range(len(SPECS)):
                one = model(**next_single(inputs, SPECS, i)).logits[0, -1]
                torch.testing.assert_close(out[i], one, atol=1e-4, rtol=1e-4)
            a = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            b = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
        finally:
            mmsink.unwrap(model)
    assert torch.equal(a, b)
    assert (out[:2] - plain[:2]).abs().max() > 1e-4


@pytest.mark.parametrize("budget", [0.5, 24, 0.9, 30])
def test_visionzip_rows_at_once_equal_each_row_alone(budget):
    """The batched merge (rows of different sizes and budgets, absent tokens masked) gives, row by row,
    what the merge of that row's present tokens alone gives: same keep set, same merged features."""
    from mmsink.pruners.visionzip import VisionZip

    g = torch.Generator().manual_seed(3)
    rows, p, f = 5, 40, 8
    features, score = torch.randn(rows, p, f, generator=g), torch.rand(rows, p, generator=g)
    metric = torch.randn(rows, p, 6, generator=g)
    present = torch.rand(rows, p, generator=g) > 0.3
    present[0] = True
    parts = [1, 2, 2, 2, 1]
    pruner = VisionZip(budget=budget)
    ctx = types.SimpleNamespace(extra_flops=0, run={})
    out, keep = pruner.zip(ctx, features, score, metric, parts, present)
    assert len({int(keep[i].sum()) for i in range(rows)}) > 1  # rows really differ in budget
    # the host's count of each image's kept tokens (its rows: 1, 2, 2) is the keep mask's
    groups = [keep[0:1], keep[1:3], keep[3:5]]
    assert ctx.run.pop("kept_images") == [int(k.sum()) for k in groups]
    for i in range(rows):
        idx = present[i].nonzero().squeeze(1)
        o, k = pruner.zip(ctx, features[i, idx][None], score[i, idx][None], metric[i, idx][None], [parts[i]])
        assert torch.equal(keep[i, idx], k[0]) and not keep[i, ~present[i]].any()
        torch.testing.assert_close(out[i, idx], o[0])
        assert torch.equal(out[i, ~present[i]], features[i, ~present[i]])


def test_grids_of_images_back_to_back_share_one_run():
    """Images with no text between them are one run of the layout: their grids follow each other,
    offset by the earlier images' token counts (newlines included)."""
    runs_of = mmsink.patches.llava_next.runs_of
    a = (14, [(0, 2, 2, 2), (4, 2, 4, 5)])
    b = (10, [(0, 2, 2, 2), (4, 2, 2, 3)])
    c = (24, [(0, 2, 2, 2), (4, 4, 4, 5)])
    grids = runs_of([a, b, c], [[24], [24]])  # sample 0: a and b back to back; sample 1: c
    assert grids == [[a[1] + [(14, 2, 2, 2), (18, 2, 2, 3)]], [c[1]]]
