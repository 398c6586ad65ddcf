"""Qwen2-VL and Qwen2.5-VL specifics: M-RoPE positions carried by kept tokens, budgets on small images,
VisionZip without [CLS], ViT sinks on merged patches (the shared contract: test_families.py)."""

import pytest
import torch
from tiny import QWEN_IMAGE, prefill_stats, qwen_batch, qwen_single, tiny_qwen

import mmsink

SPECS = [(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)]), (3, 5, [])]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model(request):
    return tiny_qwen(request.param)


@pytest.fixture(scope="module")
def data():
    return qwen_batch(SPECS, seed=1)


def test_kept_tokens_keep_their_mrope_positions(model, data):
    """The rotary rows a pruned layer sees for kept tokens are the unpruned model's rows for those tokens
    (3-D t/h/w positions, so a kept image token keeps its place in the image grid)."""
    inputs, _ = data
    layers = model.model.language_model.layers
    seen = []

    def grab(m, a, k):
        seen.append(k["position_embeddings"][0].clone())

    with torch.no_grad():
        h = layers[4].register_forward_pre_hook(grab, with_kwargs=True)
        model(**inputs)
        h.remove()
        mmsink.wrap(model, prune="fastv", budget=6)
        h = layers[4].register_forward_pre_hook(grab, with_kwargs=True)
        model(**inputs)
        h.remove()
        st = mmsink.stats(model)
        mmsink.unwrap(model)
    full, pruned = seen
    full = full.expand(inputs["input_ids"].shape[0], -1, -1)
    for i in range(len(SPECS)):
        valid = inputs["attention_mask"][i].bool()
        dropped = set(st.kept_indices[0][i]) - set(st.kept_indices[4][i])
        pos = [j for j in valid.nonzero().flatten().tolist() if j not in dropped]
        torch.testing.assert_close(pruned[i, -len(pos) :], full[i, pos])
        img = [j for j in pos if inputs["input_ids"][i, j] == QWEN_IMAGE]
        assert len(img) == len(st.kept_indices[4][i])


def test_budget_larger_than_a_small_image(model, data):
    inputs, _ = data
    mmsink.wrap(model, prune="fastv", budget=9)  # the 4x8 patch image has 8 tokens
    try:
        with pytest.raises(ValueError, match="budget 9 is larger than the image's 8 visual tokens"):
            with torch.no_grad():
                model(**inputs)
    finally:
        mmsink.unwrap(model)


def test_visionzip_keeps_the_most_attended_tokens(model, data, monkeypatch):
    """VisionZip without [CLS]: each image keeps its top tokens by the attention they receive in the last
    vision block (full softmax matrices here, from the block's own inputs in an unwrapped run; the library
    works in query chunks, made small to exercise them), plus the contextual targets, budget per image.
    Qwen2.5's window order is undone independently by matching merger rows to the tower's raster output."""
    import mmsink.patches.qwen2_vl as family
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    monkeypatch.setattr(family, "CHUNK", 5)
    inputs, _ = data
    attn = model.model.visual.blocks[-1].attn
    seen, merger_in, vis_out = [], [], []
    hooks = [
        attn.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True),
        model.model.visual.merger.register_forward_pre_hook(lambda m, a: merger_in.append(a[0])),
        model.model.visual.register_forward_hook(lambda m, a, o: vis_out.append(o) and None),
    ]
    try:
        with torch.no_grad():
            model(**inputs)  # the untouched model: what the tower computes, and its token order
    finally:
        for h in hooks:
            h.remove()
    st = prefill_stats(model, inputs, prune="visionzip", budget=0.5)
    ((args, kw),) = seen
    x = args[0] if args else kw["hidden_states"]
    n = x.shape[0]
    with torch.no_grad():
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *kw["position_embeddings"])
        cu = kw["cu_seqlens"].tolist()
        received = torch.cat(
            [
                torch.softmax(q[s:e].transpose(0, 1) @ k[s:e].permute(1, 2, 0) * attn.scaling, -1)
                .mean(0)  # heads
                .mean(0)  # queries
                for s, e in zip(cu[:-1], cu[1:])
            ]
        )
        score = received.view(-1, 4).mean(1)  # per merged token, in the merger's order
        if hasattr(model.model.visual, "window_size"):
            merged = model.model.visual.merger(merger_in[0])
            raster = torch.cat(list(vis_out[0].pooler_output))
            score = score[torch.cdist(raster.float(), merged.float()).argmin(1)]
    start = 0  # token index over all images, in batch order
    for sample, (_, _, images) in enumerate(SPECS):
        kept = set(st.kept_indices[0][sample])
        positions = (inputs["input_ids"][sample] == QWEN_IMAGE).nonzero().squeeze(1).tolist()
        off = 0
        for h, w in images:
            t = h * w // 4
            pos = positions[off : off + t]
            total = -(-t // 2)  # ceil(t * 0.5)
            contextual = min(round(total * 10 / 64), total - 1)
            top = score[start : start + t].topk(total - contextual).indices.tolist()
            assert {pos[i] for i in top} <= kept  # the dominant tokens
            assert len(kept & set(pos)) == total  # dominant + contextual targets
            off += t
            start += t


def test_vit_sinks(model, data):
    """ViT sinks on merged patches: a token's norm is the max over its 2x2 patches (Qwen2.5: windows
    undone). They survive pruning, batched == per-sample, cached == uncached; on Qwen2-VL the flagged
    tokens are the top-3 by that norm, computed here from the merger's input."""
    inputs, _ = data
    seen, vis_out = [], []
    h = model.model.visual.merger.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    hv = model.model.visual.register_forward_hook(lambda m, a, o: vis_out.append(o) and None)
    sinks = {"factor": 1.01, "max_sinks": 3, "to_front": True}
    mmsink.wrap(model, prune="fastv", budget=6, sink_forward=sinks)
    try:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
            st = mmsink.stats(model)
            for i in range(len(SPECS)):
                one = model(**qwen_single(inputs, SPECS, i)).logits[0, -1]
                torch.testing.assert_close(out[i], one, atol=1e-4, rtol=1e-4)
            a = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            b = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    finally:
        mmsink.unwrap(model)
        h.remove()
        hv.remove()
    assert torch.equal(a, b)
    found = st.extra["vit_sinks"]
    assert [len(x) for x in found] == [3, 6, 0]
    for i, sample in enumerate(found):
        for layer in st.kept_indices:
            assert {s["position"] for s in sample} <= set(layer[i])
    norms = seen[0].float().norm(dim=-1).view(-1, 4).amax(1)  # per merged token, in the merger's order
    if hasattr(model.model.visual, "window_size"):
        # Qwen2.5 merges in window order and reorders afterwards. Recover that order independently of
        # transformers' window-index helper: match the merger's rows to the tower's raster-order output.
        with torch.no_grad():
            merged = model.model.visual.merger(seen[0])
        raster = torch.cat(list(vis_out[0].pooler_output))
        norms = norms[torch.cdist(raster.float(), merged.float()).argmin(1)]
    first = norms[: 8 * 12 // 4]
    assert sorted(s["patch"] for s in found[0]) == sorted(first.topk(3).indices.tolist())


def test_vision_tower_takes_inputs_computed_on_the_host(model, data, monkeypatch):
    """The wrapped model hands the vision tower its sequence bounds, rotary positions (and Qwen2.5-VL's
    windows) computed from one host copy of ``image_grid_thw``: every block gets exactly those (so none
    reads its split sizes from the device), they equal what the tower computes itself, and the image
    features are unchanged."""
    inputs, _ = data
    blocks = model.model.visual.blocks
    seen = []

    def grab(m, a, k):
        seen.append((k["cu_seqlens"], k["position_embeddings"][0]))

    def features():
        hooks = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in blocks]
        try:
            with torch.no_grad():
                return model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_grid_thw"]
                ).pooler_output
        finally:
            for h in hooks:
                h.remove()

    plain = features()
    own = list(seen)
    seen.clear()
    mmsink.wrap(model, prune="fastv", budget=6)
    try:
        family = mmsink.api.get_handle(model).family
        made = []
        real = family.vision_inputs
        monkeypatch.setattr(family, "vision_inputs", lambda *a: made.append(real(*a)) or made[-1])
        wrapped = features()
    finally:
        mmsink.unwrap(model)
    assert len(made) == 1 and len(seen) == len(blocks)
    windowed = "cu_window_seqlens" in made[0]
    for i, (cu, pe) in enumerate(seen):
        full = not windowed or i in model.model.visual.fullatt_block_indexes
        assert cu is made[0]["cu_seqlens" if full else "cu_window_seqlens"]  # ours, not recomputed
        assert torch.equal(cu, own[i][0]) and torch.equal(pe, own[i][1])
    for a, b in zip(wrapped, plain):
        assert torch.equal(a, b)
