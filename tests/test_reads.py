"""Host reads of device values (each one a sync on a GPU): the counter itself, and how many a wrapped
prefill makes per method, where each read is accounted for."""

import pytest
import torch
from tiny import batch, prompt, tiny_llava

import mmsink
from mmsink.tools.reads import DeviceReads


def test_counter_sees_reads_and_only_reads():
    t = torch.arange(6)
    with DeviceReads() as r:
        t.tolist()
        t.sum().item()
        bool(t.any())
        int(t.max())
        t.nonzero()
        t[t > 2]
        torch.repeat_interleave(t, t)
        float(t[0])
    assert r.total == 8 and len(r.sites) == 8  # one site per line
    with DeviceReads() as r:
        t[t.argmax()]  # an index tensor: no size from values
        t.repeat_interleave(t, output_size=15)
        torch.where(t > 2, t, 0).cumsum(0)
        t.shape[0] + len(t)
    assert r.total == 0


def spy_repack(monkeypatch) -> list:
    """Record, at every plan change, the widths handed to ``repack`` (None: it reads them) and the keep
    mask's own (fewest, most, total) kept slots."""
    from mmsink.core import plan

    seen = []
    real = plan.repack

    def spy(seg, keep, start, widths=None):
        k = (keep & seg.valid).sum(1)
        seen.append((widths, (int(k.min()), int(k.max()), int(k.sum()))))
        return real(seg, keep, start, widths)

    monkeypatch.setattr(plan, "repack", spy)
    return seen


def spy_widths(monkeypatch, module) -> list:
    """Record every ``group_indices`` call made through ``module``: the width handed in and the
    membership's largest count."""
    seen = []
    real = module.group_indices

    def spy(member, m=None):
        seen.append((m, int(member.sum(1).max())))
        return real(member, m)

    monkeypatch.setattr(module, "group_indices", spy)
    return seen


def visipruner_prefill(model, data, **opts):
    """(mmsink's reads in one VisiPruner prefill, logits, kept indices, per-sample FLOPs, fusion layers)."""
    mmsink.wrap(model, prune="visipruner", **opts)
    try:
        with torch.no_grad(), DeviceReads() as r:
            logits = model(**data).logits
        st = mmsink.stats(model)
    finally:
        mmsink.unwrap(model)
    reads = sum(c for s, c in r.sites.items() if "/mmsink/" in s and "/transformers/" not in s)
    return reads, logits, st.kept_indices, st.extra["sample_prefill_flops"], st.extra["fusion_layer"]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=8)


# (method, options, reads of mmsink's own code in one prefill, what they are)
EXPECTED = [
    ("fastv", {"budget": 6}, 1, "layout (the plan change's counts are known on the host)"),
    ("pdrop", {}, 1, "layout (each stage's counts from the last one's, on the host)"),
    ("dart", {"budget": 6}, 1, "layout (pivots' width and the kept counts from the host sizes)"),
    ("visionzip", {"budget": 6}, 1, "layout (each image's kept tokens from its budget split, on the host)"),
    ("visipruner", {"budget": 6}, 3, "layout, observed layers 3 and 4"),
    ("visipruner", {"budget": 6, "mask_until_fallback": True}, 2, "layout, the fallback at L/2"),
    ("visipruner", {}, 1 + 4, "layout, observed layers 3..6 (adaptive; not the last)"),
]


@pytest.mark.parametrize("method,opts,n,what", EXPECTED)
def test_reads_per_prefill(model, method, opts, n, what):
    """A read added to the prefill path fails here: each one must be accounted for (and not made per
    layer). Padded batch of two; transformers' own reads (mask building) are not counted."""
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    mmsink.wrap(model, prune=method, **opts)
    try:
        with torch.no_grad():
            model(**inputs)
            with DeviceReads() as r:
                model(**inputs)
        layers = mmsink.stats(model).kept_tokens
    finally:
        mmsink.unwrap(model)
    ours = {s: c for s, c in r.sites.items() if "/mmsink/" in s and "/transformers/" not in s}
    assert sum(ours.values()) == n, (what, ours, layers)


@pytest.mark.parametrize("layers", [8, 16])
@pytest.mark.parametrize("threshold", [0.995, 0.9999])
def test_visipruner_fixed_budget_reads_twice_at_any_depth(monkeypatch, layers, threshold):
    """Fixed-budget VisiPruner reads the device twice a prefill (the layout, the plan change at the fallback
    layer) however many layers it observes, whether samples fuse before the fallback (``threshold`` 0.9999:
    their tokens are masked until it) or at it; kept sets, per-sample FLOPs and logits as with a read and a
    gather per observed layer (``mask_until_fallback=False``), which reads once per observed layer up to the
    fallback; bitwise when no sample fuses early."""
    model = tiny_llava(layers=layers)
    data = batch([prompt(5, 7, images=2, seed=1), prompt(2, 4, seed=2), prompt(3, 9, seed=3)])
    opts = {"budget": 5, "layer_threshold": threshold}
    got = {m: visipruner_prefill(model, data, **opts, mask_until_fallback=m) for m in (True, False)}
    fallback, first = layers // 2, round(6 * layers / 32) + 1  # the first observed layer: S + 1
    fused = got[True][4]
    assert got[True][0] == 2
    assert got[False][0] == 1 + max(fused) - first + 1  # until every sample has fused
    assert got[True][2:] == got[False][2:]
    if min(fused) == fallback:
        assert torch.equal(got[True][1], got[False][1])
    else:
        torch.testing.assert_close(got[True][1], got[False][1], atol=1e-5, rtol=1e-5)
    if threshold > 0.999 and layers == 16:
        assert min(fused) < fallback  # the masked path is exercised


@pytest.mark.parametrize(
    "method,opts",
    [
        ("fastv", {"budget": 6}),
        ("fastv", {"budget": 0.3}),
        ("fastv", {"budget": 10, "budget_per": "prompt"}),
        ("dart", {"budget": 5}),
        ("pdrop", {}),
        ("pdrop", {"budget": 9}),
        ("visionzip", {"budget": 6}),
        ("visionzip", {"budget": 0.2}),
    ],
)
@pytest.mark.parametrize("padded", [False, True])
def test_host_counts_of_the_plan_equal_the_device(model, monkeypatch, method, opts, padded):
    """FastV / DART / PDrop / VisionZip know on the host how many tokens each sample keeps (its text
    tokens plus k of each image's current tokens), so their plan changes read nothing and a prefill reads
    the device once (its layout). The counts handed to the plan equal the keep mask's own at every change,
    for one and two images a prompt, per-image and per-prompt budgets, integer and fractional, padded or
    not."""

    seen = spy_repack(monkeypatch)
    if padded:
        data = batch([prompt(5, 7, images=2, seed=1), prompt(2, 4, seed=2), prompt(3, 9, seed=3)])
        assert not bool(data["attention_mask"].all())
    else:
        data = batch([prompt(5, 7, images=2, seed=1), prompt(5, 7 + 2 + 36, images=1, seed=2)])
        assert bool(data["attention_mask"].all())
    mmsink.wrap(model, prune=method, **opts)
    try:
        with torch.no_grad(), DeviceReads() as r:
            model(**data)
    finally:
        mmsink.unwrap(model)
    assert seen and all(w == actual for w, actual in seen)
    assert sum(c for s, c in r.sites.items() if "/mmsink/" in s) == 1  # the layout's


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("prompt_len", [None, 60])
@pytest.mark.parametrize("rule", ["7b", "13b"])
def test_visipruner_shallow_widths_from_the_host(model, monkeypatch, padded, prompt_len, rule):
    """VisiPruner's shallow-stage row sets and key groups are sized from the layout's host facts (no
    read at layer 0, where the host would wait for the vision tower): each width equals its membership's
    largest count on the device (a smaller one would drop rows silently); images after the prompt's end
    (``prompt_len``) and padding included. The 13B rule's halves are indexed only under that rule."""
    from mmsink.pruners import visipruner

    seen = spy_widths(monkeypatch, visipruner)
    prompts = [prompt(5, 7, images=2, seed=1), prompt(2, 4, seed=2)]
    if not padded:
        prompts = [prompts[0], prompt(5, 7 + 2 + 36, seed=2)]
    data = batch(prompts)
    mmsink.wrap(model, prune="visipruner", budget=6, first_layer_rule=rule)
    try:
        handle = mmsink.api.get_handle(model)
        handle.prompt_len = prompt_len  # selection anchored before the second image of sample 0
        with torch.no_grad(), DeviceReads() as r:
            model(**data)
    finally:
        mmsink.unwrap(model)
    # 2 row sets, the non-image keys, 2 images (+ the 13B rule's 2 halves)
    assert len(seen) == (7 if rule == "13b" else 5) and all(m == actual for m, actual in seen), seen
    assert not [s for s in r.sites if "visipruner.py" in s or "attention.py" in s]


@pytest.mark.parametrize("method,opts", [(None, {}), ("fastv", {"budget": 6}), ("pdrop", {})])
def test_var_rows_sized_from_the_host(model, monkeypatch, method, opts):
    """VAR's edited rows (text after the first image) are indexed per segment with a width from the host
    (text tokens are never dropped): equal to the membership's largest count on every segment, and a VAR
    prefill reads the device once (its layout), pruned or not."""
    from test_var import VAR

    from mmsink.sinks import var

    seen = spy_widths(monkeypatch, var)
    data = batch([prompt(5, 7, images=2, seed=1), prompt(2, 4, seed=2)])
    mmsink.wrap(model, prune=method, var=VAR, **opts)
    try:
        with torch.no_grad(), DeviceReads() as r:
            model(**data)
    finally:
        mmsink.unwrap(model)
    assert seen and all(m == actual for m, actual in seen), seen
    assert sum(c for s, c in r.sites.items() if "/mmsink/" in s) == 1


@pytest.mark.parametrize("padded", [False, True])
def test_replayed_plan_reads_no_more_than_the_method(model, monkeypatch, padded):
    """The ideal row (a recorded plan replayed) hands the plan its counts from the recorded indices too, so
    it reads the device no more than the method it is the ideal of; the counts equal the keep masks'."""

    prompts = [prompt(5, 7, images=2, seed=1), prompt(2, 4, seed=2)]
    if not padded:
        prompts = [prompts[0], prompt(5, 7 + 2 + 36, seed=2)]
    data = batch(prompts)
    mmsink.wrap(model, prune="pdrop")
    with torch.no_grad():
        model(**data)
    recorded = mmsink.stats(model).kept_indices
    seen = spy_repack(monkeypatch)
    mmsink.wrap(model, prune="replay", plan=recorded)
    try:
        with torch.no_grad():
            model(**data)  # builds the plan's masks (once per input shape)
            with DeviceReads() as r:
                model(**data)
        assert mmsink.stats(model).kept_indices == recorded
    finally:
        mmsink.unwrap(model)
    assert len(seen) == 6 and all(w == actual for w, actual in seen)  # 3 stages, two calls
    assert sum(c for s, c in r.sites.items() if "/mmsink/" in s) == 1


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize(
    "method,opts", [("visionzip", {"budget": 0.5}), ("visionzip", {"budget": 3}), ("fastv", {"budget": 0.25})]
)
def test_host_counts_on_tiled_and_dynamic_images(monkeypatch, family, method, opts):
    """The same on LLaVA-NeXT (tiles sharing an image's budget, unpadded crops) and Qwen2-VL / 2.5-VL
    (images of their own sizes): the counts handed to the plan equal the keep mask's, one read of
    mmsink's own code in the prefill."""
    from tiny import next_batch, qwen_batch, tiny_llava_next, tiny_qwen

    if family == "llava_next":
        model = tiny_llava_next()
        data, _ = next_batch(model, [(3, 5, [(40, 56)]), (2, 4, [(56, 40), (28, 28)])], seed=1)
    else:
        model = tiny_qwen(family)
        data, _ = qwen_batch([(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)])], seed=1)
    seen = spy_repack(monkeypatch)
    mmsink.wrap(model, prune=method, **opts)
    with torch.no_grad(), DeviceReads() as r:
        model(**data)
    assert seen and all(w == actual for w, actual in seen), seen
    assert sum(c for s, c in r.sites.items() if "/mmsink/" in s) == 1, r.sites


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_no_read_in_transformers_code_after_the_tower(monkeypatch, family):
    """A dense prefill of the wrapped LLaVA / NeXT model makes none of transformers' reads that would
    wait for the vision tower (the placeholder count is checked against the layout's host sizes; a batch
    without padding passes no mask): logits bitwise the unwrapped model's, and a placeholder mismatch
    still fails with transformers' message."""
    from tiny import next_batch, tiny_llava_next

    if family == "llava":
        model = tiny_llava(layers=4)
        data = batch([prompt(5, 7, images=2, seed=1), prompt(5, 7 + 2 + 36, seed=2)])
    else:
        model = tiny_llava_next(layers=4)
        data, _ = next_batch(model, [(3, 5, [(40, 56)])], seed=1)
    assert bool(data["attention_mask"].all())

    def run():
        with torch.no_grad(), DeviceReads() as r:
            logits = model(**data).logits
        return [s for s in r.sites if "masking_utils" in s or "import_utils" in s], logits

    plain, ref = run()
    mmsink.wrap(model, prune="fastv", budget=0.5)
    try:
        ours, _ = run()
        mmsink.wrap(model, prune="none")
        none, logits = run()
        bad = dict(data, input_ids=data["input_ids"].clone())
        bad["input_ids"][0, -1] = model.config.image_token_id  # one placeholder too many
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            with torch.no_grad():
                model(**bad)
    finally:
        mmsink.unwrap(model)
    assert plain and not ours and not none
    assert torch.equal(logits, ref)
    assert "get_placeholder_mask" not in model.model.__dict__
