"""Tiny LLaVA models built from configs (random weights) and prompts with image tokens."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 100
PAD = 0
SIDE = 6  # 6x6 = 36 tokens per image


def clip(image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        projection_dim=32,
    )


def llama(layers: int, kv_heads: int = 2, **extra) -> dict:
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=128,
        max_position_embeddings=512,
        pad_token_id=PAD,
        **extra,
    )


def finish(model, attn: str):
    """Sharper attention than the default init (so selections are not ties), then the backend."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_llava(layers: int = 8, attn: str = "sdpa", seed: int = 0, kv_heads: int = 2):
    cfg = LlavaConfig(
        vision_config=clip(14 * SIDE),
        text_config=LlamaConfig(**llama(layers, kv_heads)),
        image_token_id=IMAGE_TOKEN,
        image_seq_length=SIDE * SIDE,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return finish(LlavaForConditionalGeneration(cfg), attn)


def prompt(n_sys: int, n_text: int, images: int = 1, seed: int = 0, gap: int = 2) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = [1] + torch.randint(3, 90, (n_sys,), generator=g).tolist()
    for i in range(images):
        if i:
            ids += torch.randint(3, 90, (gap,), generator=g).tolist()
        ids += [IMAGE_TOKEN] * (SIDE * SIDE)
    return ids + torch.randint(3, 90, (n_text,), generator=g).tolist()


def batch(prompts: list[list[int]], seed: int = 0):
    """Left-padded batch with pixel values for every image."""
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), PAD)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    n_img = sum(p.count(IMAGE_TOKEN) for p in prompts) // (SIDE * SIDE)
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(n_img, 3, 14 * SIDE, 14 * SIDE, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix}


def pixels_of(inputs, prompts, i):
    """Pixel values of sample i alone."""
    per = [p.count(IMAGE_TOKEN) // (SIDE * SIDE) for p in prompts]
    start = sum(per[:i])
    return inputs["pixel_values"][start : start + per[i]]


def llava_single(inputs, prompts, i):
    """Sample i of a ``batch(prompts)``, alone and unpadded (no pixel values when it has no image)."""
    p = prompts[i]
    return {
        "input_ids": torch.tensor([p]),
        "attention_mask": torch.ones(1, len(p), dtype=torch.long),
        "pixel_values": pixels_of(inputs, prompts, i) if IMAGE_TOKEN in p else None,
    }


def tiny_llava_next(layers: int = 8, attn: str = "sdpa", seed: int = 0):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(
        vision_config=clip(28),
        text_config=LlamaConfig(**llama(layers)),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return finish(LlavaNextForConditionalGeneration(cfg), attn)


def next_batch(model, specs, seed=0):
    """specs: per sample (n_sys, n_text, [image (h, w), ...]). Left-padded LLaVA-NeXT inputs whose image
    token counts come from the model's own packing of each image."""
    g = torch.Generator().manual_seed(seed)
    sizes = [s for _, _, imgs in specs for s in imgs]
    pix = torch.randn(len(sizes), 5, 3, 28, 28, generator=g)
    image_sizes = torch.tensor(sizes)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pix, image_sizes=image_sizes, return_dict=True)
    counts = [f.shape[0] for f in feats.pooler_output]
    prompts, k = [], 0
    for n_sys, n_text, imgs in specs:
        ids = [1] + torch.randint(3, 90, (n_sys,), generator=g).tolist()
        for _ in imgs:
            ids += [IMAGE_TOKEN] * counts[k] + torch.randint(3, 90, (2,), generator=g).tolist()
            k += 1
        prompts.append(ids + torch.randint(3, 90, (n_text,), generator=g).tolist())
    out = batch(prompts)
    out["pixel_values"], out["image_sizes"] = pix, image_sizes
    return out, prompts


def next_single(inputs, specs, i):
    """Sample i of a next_batch, alone and unpadded."""
    mask = inputs["attention_mask"][i].bool()
    start = sum(len(s[2]) for s in specs[:i])
    end = start + len(specs[i][2])
    return {
        "input_ids": inputs["input_ids"][i][mask][None],
        "attention_mask": torch.ones(1, int(mask.sum()), dtype=torch.long),
        "pixel_values": inputs["pixel_values"][start:end] if end > start else None,
        "image_sizes": inputs["image_sizes"][start:end] if end > start else None,
    }


QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 120, 121, 122, 123


def tiny_qwen(
    kind: str = "qwen2_vl", layers: int = 8, attn: str = "sdpa", seed: int = 0, depth: int | None = None
):
    """Tiny Qwen2-VL (or Qwen2.5-VL) with M-RoPE (head dim 16, sections 2/3/3); ``depth``: vision blocks."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    common = dict(
        text_config=llama(layers, rope_parameters=rope),
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
    )
    if kind == "qwen2_vl":
        vision = dict(
            depth=depth or 2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        cfg, cls = Qwen2VLConfig(vision_config=vision, **common), Qwen2VLForConditionalGeneration
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(
            depth=4,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1, 3],
        )
        cfg, cls = Qwen2_5_VLConfig(vision_config=vision, **common), Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    return finish(cls(cfg), attn)


def qwen_batch(specs, seed=0):
    """specs: per sample (n_sys, n_text, [(h, w) patch grid of each image]). Left-padded inputs with
    vision start/end tokens, pixel patches, image_grid_thw and mm_token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    prompts, grids = [], []
    for n_sys, n_text, imgs in specs:
        ids = [1] + torch.randint(3, 90, (n_sys,), generator=g).tolist()
        for h, w in imgs:
            ids += [QWEN_START] + [QWEN_IMAGE] * (h * w // 4) + [QWEN_END]
            grids.append([1, h, w])
        prompts.append(ids + torch.randint(3, 90, (n_text,), generator=g).tolist())
    out = batch_ids(prompts)
    n_patch = sum(h * w for _, h, w in grids)
    out["pixel_values"] = torch.randn(n_patch, 3 * 2 * 14 * 14, generator=g) if grids else None
    out["image_grid_thw"] = torch.tensor(grids) if grids else None
    out["mm_token_type_ids"] = (out["input_ids"] == QWEN_IMAGE).long()
    return out, prompts


def batch_ids(prompts):
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), PAD)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def qwen_single(inputs, specs, i):
    mask = inputs["attention_mask"][i].bool()
    ids = inputs["input_ids"][i][mask][None]
    grids = inputs["image_grid_thw"]
    start = sum(len(s[2]) for s in specs[:i])
    end = start + len(specs[i][2])
    patches = (grids[:, 1] * grids[:, 2]).tolist() if grids is not None else []
    p0, p1 = sum(patches[:start]), sum(patches[:end])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": inputs["pixel_values"][p0:p1] if end > start else None,
        "image_grid_thw": grids[start:end] if end > start else None,
        "mm_token_type_ids": (ids == QWEN_IMAGE).long(),
    }


def split_map(layers: int, first: int, head, tail, last=None) -> dict:
    """A LLaVA ``device_map``: vision, projector, embeddings and decoder layers below ``first`` on
    ``head``, the other layers on ``tail``, final norm and lm_head on ``last`` (default ``tail``)."""
    last = tail if last is None else last
    lm = "model.language_model"
    dm = {"model.vision_tower": head, "model.multi_modal_projector": head, f"{lm}.embed_tokens": head}
    dm.update({f"{lm}.rotary_emb": head, f"{lm}.norm": last, "lm_head": last})
    dm.update({f"{lm}.layers.{i}": head if i < first else tail for i in range(layers)})
    return dm


def generate_each(models, inputs, method, opts, device=None, **gen):
    """For each model, wrapped with ``method``: (greedy tokens on CPU, its prefill stats)."""
    import mmsink

    out = []
    for m in models:
        mmsink.wrap(m, prune=method, **opts)
        try:
            x = {k: v.to(device) for k, v in inputs.items()} if device else inputs
            with torch.no_grad():
                tokens = m.generate(**x, do_sample=False, **gen)
            out.append((tokens.cpu(), mmsink.stats(m)))
        finally:
            mmsink.unwrap(m)
    return out


def prefill_stats(model, inputs, **settings):
    """Stats of one no-grad forward of ``model`` wrapped with ``settings``; unwrapped afterwards."""
    import mmsink

    mmsink.wrap(model, **settings)
    try:
        with torch.no_grad():
            model(**inputs)
        return mmsink.stats(model)
    finally:
        mmsink.unwrap(model)


def counted_prefill(model, inputs, **settings):
    """(the last prefill's Stats under ``wrap(model, **settings)``, the FLOPs ``FlopCounterMode`` counted
    for that prefill): the check every method's FLOPs accounting must pass."""
    from torch.utils.flop_counter import FlopCounterMode

    import mmsink

    mmsink.wrap(model, **settings)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(**inputs)
        st = mmsink.stats(model)
    finally:
        mmsink.unwrap(model)
    return st, fc.get_total_flops()


def batched_and_cached(model, inputs, single, samples: int, new_tokens: int, **settings):
    """Under ``wrap(model, **settings)``: each sample's last logits in the batch equal its run alone
    (``single(inputs, i)``), checked here; returns the batch's Stats and its greedy tokens with and without
    the cache (the caller compares them)."""
    import mmsink

    mmsink.wrap(model, **settings)
    try:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
            st = mmsink.stats(model)
            for i in range(samples):
                one = model(**single(inputs, i)).logits[0, -1]
                torch.testing.assert_close(out[i], one, atol=1e-4, rtol=1e-4)
            a = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            b = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, use_cache=False)
    finally:
        mmsink.unwrap(model)
    return st, a, b


GREEDY_SCORES = dict(do_sample=False, return_dict_in_generate=True, output_scores=True)


def greedy(model, inputs, n: int, **gen):
    """``generate``'s greedy output with its per-step scores (no grad)."""
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, **{**GREEDY_SCORES, **gen})


def two_prompts():
    """Two LLaVA prompts of different lengths (45 and 57 tokens): a left-padded batch of two."""
    return [prompt(3, 5, seed=1), prompt(9, 11, seed=2)]


def fast_and_generate(model, inputs, n: int = 4, **settings):
    """(generate_fast's tokens, generate's greedy tokens) of ``model`` wrapped with ``settings``."""
    import mmsink

    mmsink.wrap(model, **settings)
    try:
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=n, do_sample=False)
            fast = mmsink.generate_fast(model, max_new_tokens=n, compile=False, **inputs)
    finally:
        mmsink.unwrap(model)
    return fast, ref


def module_model(build):
    """A test module's ``model`` fixture (built once) and an autouse fixture that unwraps it after each
    test: ``model, unwrapped = module_model(lambda: tiny_llava(layers=4))``."""
    import pytest

    import mmsink

    @pytest.fixture(scope="module")
    def model():
        return build()

    @pytest.fixture(autouse=True)
    def unwrapped(model):
        yield
        if model.__dict__.get("_mmsink") is not None:
            mmsink.unwrap(model)

    return model, unwrapped


# Shared by the KV-cache-after-pruning tests (tests/test_kv_prune.py, tests/test_kv_quant_prune.py).

# method, budget for tiny_llava(layers=4): one cut at layer 2, three stages, before the LLM
KV_PRUNERS = [("fastv", 4), ("pdrop", 24), ("random", 6)]


def held_columns(ids_row, mask_row, kept_visual, n_new: int) -> list[int]:
    """The stream columns a pruned layer holds without eviction: the real text ones, the visual ones its
    pruner kept, then ``n_new`` new ones."""
    length = len(mask_row)
    text = [c for c in range(length) if mask_row[c] and ids_row[c] != IMAGE_TOKEN]
    return sorted(text + list(kept_visual)) + [length + j for j in range(n_new)]


def check_batched_equals_alone(model, n: int, beams: int = 1, prompts=None):
    """``model`` as wrapped, on the left-padded ``batch`` of ``prompts`` (default ``two_prompts()``) and on
    each sample alone (its own pixel values): the same new tokens and, greedy, per-step scores within 1e-4.
    Returns the batch's output (the caller checks its cache)."""
    ps = two_prompts() if prompts is None else prompts
    inputs = batch(ps)
    gen = {} if beams == 1 else {"num_beams": beams, "output_scores": False}
    out = greedy(model, inputs, n, **gen)
    width = inputs["input_ids"].shape[1]
    for i, p in enumerate(ps):
        one = batch([p])
        one["pixel_values"] = pixels_of(inputs, ps, i)
        alone = greedy(model, one, n, **gen)
        assert torch.equal(out.sequences[i, width:], alone.sequences[0, len(p) :])
        if beams == 1:
            for a, b in zip(out.scores, alone.scores, strict=True):
                torch.testing.assert_close(a[i], b[0], rtol=1e-4, atol=1e-4)
    return out


def massive_llava(tokens, channel: int = 5, layers: int = 4):
    """tiny_llava whose ``tokens`` embed 400 on ``channel``: massive activations the sink detector flags
    (hidden size 64: |x_d| / RMS(x) <= 8, hence tau 5 in the tests)."""
    model = tiny_llava(layers=layers)
    with torch.no_grad():
        for t in tokens:
            model.model.language_model.embed_tokens.weight[t, channel] = 400.0
    return model


def prompts_with(token: int):
    """``two_prompts()`` with ``token`` in the middle of the second (8 from its end)."""
    a, b = two_prompts()
    b[len(b) - 8] = token
    return [a, b]


def massive_token_model(channel: int = 5, token: int = 7):
    """tiny_llava(layers=4) whose ``token`` embeds 400 on ``channel`` (a massive activation the sink
    detector flags) and a one-image prompt holding it mid-prompt: (model, prompt, its column)."""
    model = massive_llava([token], channel)
    p = prompt(3, 12, seed=4)
    col = len(p) - 6
    p[col] = token
    return model, p, col


def fast(model, inputs, n: int, **kw):
    """``mmsink.generate_fast``'s tokens (no torch.compile), without gradients."""
    import mmsink

    with torch.no_grad():
        return mmsink.generate_fast(model, max_new_tokens=n, compile=False, **inputs, **kw)


def check_fast_batched_equals_alone(model, ps, n: int):
    """``model`` as wrapped, through ``generate_fast`` on the left-padded ``batch`` of ``ps`` and on each
    sample alone (its own pixel values, no padding): the same new tokens up to the shorter of the two runs."""
    inputs = batch(ps)
    out = fast(model, inputs, n)
    width = inputs["input_ids"].shape[1]
    for i, p in enumerate(ps):
        one = batch([p])
        one["pixel_values"] = pixels_of(inputs, ps, i)
        alone = fast(model, one, n)
        m = min(out.shape[1] - width, alone.shape[1] - len(p))
        assert m > 0 and torch.equal(out[i, width : width + m], alone[0, len(p) : len(p) + m])


def replay_stand_in(captured: list, ops=None):
    """A CPU stand-in for ``mmsink.fast.decode.capture_graph``: runs the step once (the capture's warm-up),
    records it in ``captured``, and replays by running it again, inside ``ops`` (a dispatch counter) if
    given."""
    import contextlib

    def stand_in(fn):
        out = fn()
        captured.append(fn)

        def replay():
            with ops if ops is not None else contextlib.nullcontext():
                fn()

        return out, replay

    return stand_in


def fill_cache_alive_at_run(monkeypatch, decoder_class) -> list:
    """Patches ``decoder_class``'s ``fill`` / ``run``: the returned list gets, per ``run``, whether the
    cache its last ``fill`` read is still alive (after a garbage collection)."""
    import gc
    import weakref

    caches, alive = [], []
    real_fill, real_run = decoder_class.fill, decoder_class.run

    def fill(self, cache, *a, **k):
        caches.append(weakref.ref(cache))
        return real_fill(self, cache, *a, **k)

    def run(self, *a, **k):
        gc.collect()
        alive.append(caches[-1]() is not None)
        return real_run(self, *a, **k)

    monkeypatch.setattr(decoder_class, "fill", fill)
    monkeypatch.setattr(decoder_class, "run", run)
    return alive
