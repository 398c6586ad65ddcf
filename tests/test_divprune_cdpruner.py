"""DivPrune and CDPruner (pre-LLM): the kept sets equal plain ports of the official rules
(tests/official_prelm.py) on several seeds and two budgets; batched == per sample (left padding, images of
different sizes, a text-only sample) and cached == uncached decoding on LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and
Qwen2.5-VL; executed FLOPs == FlopCounterMode; ViT-sink tokens stay; the documented refusals."""

from functools import cache

import official_prelm as official
import pytest
import torch
from tiny import (
    IMAGE_TOKEN,
    QWEN_IMAGE,
    SIDE,
    batch,
    clip,
    counted_prefill,
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
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

import mmsink

# ---------------------------------------------------------------------- a tiny CLIP and tokenizer stand-ins


class WordTokenizer:
    """The LLM tokenizer's part CDPruner uses: ids -> text (one word per id)."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


class ClipTokenizer:
    """A CLIP tokenizer stand-in: BOS, ``rep`` ids per word, EOS (so questions can span several 77-token
    rows), no truncation, as the official code calls it."""

    def __init__(self, rep: int = 12):
        self.rep = rep

    def ids(self, text: str) -> list[int]:
        out = [98]
        for w in text.split():
            n = int(w[1:])
            out += [(n * 7 + r * 13) % 90 + 3 for r in range(self.rep)]
        return out + [99]

    def __call__(self, text, return_tensors="pt"):
        ids = self.ids(text)
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def tiny_clip(image_size: int, seed: int = 0) -> CLIPModel:
    text = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=98,
        eos_token_id=99,
        pad_token_id=0,
    )
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=clip(image_size).to_dict(), projection_dim=16)
    torch.manual_seed(100 + seed)
    model = CLIPModel(cfg).eval()
    model.set_attn_implementation("eager")  # FlopCounterMode does not see CPU SDPA kernels
    return model


def clip_opts(image_size: int, seed: int = 0) -> dict:
    return {
        "relevance": "clip",
        "clip": tiny_clip(image_size, seed),
        "clip_tokenizer": ClipTokenizer(),
        "tokenizer": WordTokenizer(),
    }


# ---------------------------------------------------------------------- helpers


def image_runs(ids: torch.Tensor, token: int) -> list[list[int]]:
    """Positions of each run of image tokens in one row."""
    runs, cur = [], []
    for i, t in enumerate(ids.tolist()):
        if t == token:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def input_embeds(model, inputs) -> torch.Tensor:
    """The unwrapped model's input embeddings [B, L, d] (its own merge of the image features)."""
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[0]


def kept_positions(model, inputs, method, **opts) -> list[set]:
    mmsink.wrap(model, prune=method, **opts)
    try:
        with torch.no_grad():
            model(**inputs)
        st = mmsink.stats(model)
    finally:
        mmsink.unwrap(model)
    return [set(x) for x in st.kept_indices[-1]]


def question(ids: torch.Tensor, mask: torch.Tensor, token: int) -> list[int]:
    """The prompt's text ids after its last image (the anchor is the last token here)."""
    row = ids[mask.bool()].tolist()
    last = max(i for i, t in enumerate(row) if t == token)
    return row[last + 1 :]


LLAVA_PROMPTS = [prompt(5, 7, seed=1), prompt(2, 4, seed=2, images=2)]


@cache
def llava(seed: int, attn: str = "sdpa"):
    model = tiny_llava(layers=4, attn=attn, seed=seed)
    with torch.no_grad():  # a projector whose outputs differ in scale and direction (no near-ties)
        lin = model.model.multi_modal_projector.linear_1
        lin.weight.mul_(
            1.0 + 0.5 * torch.rand(lin.weight.shape[0], 1, generator=torch.Generator().manual_seed(seed))
        )
    return model


# ---------------------------------------------------------------------- faithfulness (LLaVA-1.5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("budget", [6, 0.2])  # 0.2 * 36 = 7.2: round 7 (ceil would keep 8)
def test_divprune_matches_official(seed, budget):
    model = llava(seed)
    inputs = batch(LLAVA_PROMPTS, seed=10 + seed)
    emb = input_embeds(model, inputs)
    got = kept_positions(model, inputs, "divprune", budget=budget)
    for b in range(len(LLAVA_PROMPTS)):
        want = set()
        for run in image_runs(inputs["input_ids"][b], IMAGE_TOKEN):
            k = official.divprune_keep(budget, len(run))
            want |= {run[i] for i in official.divprune(emb[b, run], k)}
        assert got[b] == want


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("budget", [5, 12])
@pytest.mark.parametrize("relevance", ["clip", "embeds", "none"])
def test_cdpruner_matches_official(seed, budget, relevance):
    model = llava(seed)
    inputs = batch(LLAVA_PROMPTS, seed=10 + seed)
    emb = input_embeds(model, inputs)
    opts = clip_opts(14 * SIDE, seed) if relevance == "clip" else {"relevance": relevance}
    got = kept_positions(model, inputs, "cdpruner", budget=budget, **opts)
    images = (
        official.clip_image_embeds(model, opts["clip"], inputs["pixel_values"])
        if relevance == "clip"
        else None
    )
    k = 0
    for b in range(len(LLAVA_PROMPTS)):
        ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b]
        q = question(ids, mask, IMAGE_TOKEN)
        want, runs = set(), image_runs(ids, IMAGE_TOKEN)
        for run in runs:
            feats = emb[b, run][None]
            if relevance == "clip":
                text = official.clip_text_embeds(opts["clip"], ClipTokenizer().ids(WordTokenizer().decode(q)))
                picked = official.cdpruner(feats, images[k][None], text, budget)[0]
            elif relevance == "embeds":  # departure: the question's LLM input embeddings as the text side
                qpos = [i for i in range(ids.shape[0]) if mask[i] and i > runs[-1][-1]]
                picked = official.cdpruner(feats, feats.float(), emb[b, qpos].float(), budget)[0]
            else:
                picked = official.cdpruner(feats, None, None, budget)[0]
            want |= {run[i] for i in picked}
            k += 1
        assert got[b] == want


def test_cdpruner_question_spans_several_clip_rows():
    """The tiny question (7 words x 12 ids + BOS/EOS = 86 ids) takes two 77-token rows, as in the official
    chunking; the kept set then depends on the question (another question: another set)."""
    model = llava(0)
    opts = clip_opts(14 * SIDE)
    a = batch([prompt(5, 7, seed=1)], seed=3)
    b = {**a, "input_ids": a["input_ids"].clone()}
    b["input_ids"][0, -7:] = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    assert len(ClipTokenizer().ids(WordTokenizer().decode(a["input_ids"][0, -7:].tolist()))) > 77
    assert kept_positions(model, a, "cdpruner", budget=6, **opts) != kept_positions(
        model, b, "cdpruner", budget=6, **opts
    )


# ---------------------------------------------------------------------- every family: NeXT and Qwen rules

NEXT_SPECS = [(4, 6, [(28, 56)]), (2, 3, [(56, 56), (28, 28)]), (3, 5, [])]
QWEN_SPECS = [(4, 6, [(8, 12)]), (2, 3, [(4, 8), (8, 8)]), (3, 5, [])]


@cache
def family(name: str, attn: str = "sdpa"):
    if name == "llava":
        model = llava(0, attn)
        prompts = [prompt(5, 7, seed=1), prompt(2, 4, seed=2, images=2), prompt(3, 6, seed=4, images=0)]
        inputs = batch(prompts, seed=5)

        return model, inputs, lambda i: llava_single(inputs, prompts, i), len(prompts), IMAGE_TOKEN
    if name == "llava_next":
        model = tiny_llava_next(layers=4, attn=attn)
        inputs = next_batch(model, NEXT_SPECS, seed=1)[0]
        return model, inputs, lambda i: next_single(inputs, NEXT_SPECS, i), len(NEXT_SPECS), IMAGE_TOKEN
    model = tiny_qwen(name, layers=4, attn=attn)
    inputs = qwen_batch(QWEN_SPECS, seed=1)[0]
    return model, inputs, lambda i: qwen_single(inputs, QWEN_SPECS, i), len(QWEN_SPECS), QWEN_IMAGE


FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]


def method_cases(family_name):
    out = [
        ("divprune", {"budget": 3}),
        ("divprune", {"budget": 0.3}),
        ("cdpruner", {"budget": 3, "relevance": "embeds"}),
        ("cdpruner", {"budget": 0.3, "relevance": "none"}),
        ("divprune", {"budget": 0.3, "budget_per": "prompt"}),
    ]
    if family_name in ("llava", "llava_next"):
        size = 14 * SIDE if family_name == "llava" else 28
        out.append(("cdpruner", {"budget": 3, **clip_opts(size)}))
    return out


CASES = [
    pytest.param(f, m, o, id=f"{f}-{m}-{i}") for f in FAMILIES for i, (m, o) in enumerate(method_cases(f))
]


@pytest.mark.parametrize("fam,method,opts", CASES)
def test_batched_per_sample_and_cached(fam, method, opts):
    model, inputs, single, n, _ = family(fam)
    mmsink.wrap(model, prune=method, **opts)
    try:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
            st = mmsink.stats(model)
            for i in range(n):
                one = model(**single(i)).logits[0, -1]
                torch.testing.assert_close(out[i], one, atol=1e-4, rtol=1e-4)
            # image / vision ids are never generated (an uncached step would read them as image tokens)
            gen = dict(max_new_tokens=4, do_sample=False, suppress_tokens=list(range(100, 128)))
            a = model.generate(**inputs, **gen)
            b = model.generate(**inputs, **gen, use_cache=False)
    finally:
        mmsink.unwrap(model)
    assert torch.equal(a, b)
    assert min(st.kept_tokens[-1][:2]) < max(st.visual_tokens)  # it did prune


@pytest.mark.parametrize("fam,method,opts", CASES)
def test_flops_match_counter(fam, method, opts):
    model, inputs, _, _, _ = family(fam, "eager")
    st, counted = counted_prefill(model, inputs, prune=method, **opts)
    assert abs(st.prefill_flops - counted) <= 0.02 * counted, (st.prefill_flops, counted)


@pytest.mark.parametrize("fam", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("budget", [3, 0.3])
def test_divprune_official_on_every_family(fam, budget):
    """NeXT: the official DivPrune's span is the image's tokens as they enter the LLM, newline tokens
    included; Qwen: the merger's outputs. Each image of each sample against the port."""
    model, inputs, _, n, token = family(fam)
    emb = input_embeds(model, inputs)
    got = kept_positions(model, inputs, "divprune", budget=budget)
    for b in range(n):
        want = set()
        for run in image_runs(inputs["input_ids"][b], token):
            want |= {run[i] for i in official.divprune(emb[b, run], official.divprune_keep(budget, len(run)))}
        assert got[b] == want


def test_cdpruner_next_keeps_newlines_and_runs_dpp_on_the_rest():
    """LLaVA-NeXT: newline tokens are always kept; the DPP (relevance "none": r = 1) picks the budget among
    the image's other tokens, as the port does on them."""
    model, inputs, _, n, token = family("llava_next")
    emb = input_embeds(model, inputs)
    newline = model.model.image_newline.detach()
    got = kept_positions(model, inputs, "cdpruner", budget=3, relevance="none")
    for b in range(n):
        want = set()
        for run in image_runs(inputs["input_ids"][b], token):
            is_line = [bool(torch.equal(emb[b, i], newline.to(emb.dtype))) for i in run]
            want |= {i for i, line in zip(run, is_line) if line}
            rest = [i for i, line in zip(run, is_line) if not line]
            want |= {rest[i] for i in official.cdpruner(emb[b, rest][None], None, None, 3)[0]}
        assert got[b] == want


def test_cdpruner_qwen_embeds_relevance_matches_port():
    model, inputs, _, n, token = family("qwen2_vl")
    emb = input_embeds(model, inputs)
    got = kept_positions(model, inputs, "cdpruner", budget=4)  # auto: "embeds" on Qwen
    for b in range(n):
        ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b]
        runs = image_runs(ids, token)
        want = set()
        for run in runs:
            qpos = [i for i in range(ids.shape[0]) if mask[i] and ids[i] != token and i > runs[-1][-1]]
            feats = emb[b, run][None]
            want |= {run[i] for i in official.cdpruner(feats, feats.float(), emb[b, qpos].float(), 4)[0]}
        assert got[b] == want


# ---------------------------------------------------------------------- ViT sinks, refusals


@pytest.mark.parametrize(
    "method,opts", [("divprune", {"budget": 2}), ("cdpruner", {"budget": 2, "relevance": "embeds"})]
)
def test_vit_sinks_are_kept(method, opts):
    model = llava(0)
    p = prompt(5, 7, seed=1)
    inputs = batch([p], seed=1)
    seen = []
    h = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].norm(dim=-1))
    )
    with torch.no_grad():
        model(**inputs)
    h.remove()
    first = p.index(IMAGE_TOKEN)
    sinks = {first + j for j in seen[0][0].topk(3).indices.tolist()}
    plain = kept_positions(model, inputs, method, **opts)[0]
    assert not sinks <= plain  # the budget alone would drop some of them
    kept = kept_positions(model, inputs, method, sink_forward={"factor": 1.01, "max_sinks": 3}, **opts)[0]
    assert sinks <= kept


def test_refusals():
    model, inputs, _, _, _ = family("qwen2_vl")
    with pytest.raises(ValueError, match="needs clip="):
        mmsink.wrap(model, prune="cdpruner", budget=4, relevance="clip")
    with pytest.raises(ValueError, match="needs tokenizer="):
        mmsink.wrap(model, prune="cdpruner", budget=4, clip=tiny_clip(28))
    mmsink.wrap(
        model, prune="cdpruner", budget=4, relevance="clip", clip=tiny_clip(28), tokenizer=WordTokenizer()
    )
    try:
        with pytest.raises(ValueError, match="needs a CLIP vision tower"), torch.no_grad():
            model(**inputs)
    finally:
        mmsink.unwrap(model)
    with pytest.raises(ValueError, match="relevance must be one of"):
        mmsink.wrap(model, prune="cdpruner", relevance="cls")
    with pytest.raises(ValueError, match="larger than"):
        mmsink.wrap(llava(0), prune="divprune", budget=SIDE * SIDE + 1)


@pytest.mark.parametrize(
    "method,opts,reads",
    [
        ("divprune", {"budget": 5}, 0),
        ("cdpruner", {"budget": 5, "relevance": "embeds"}, 0),
        ("cdpruner", {"budget": 5, "relevance": "none"}, 0),
        ("cdpruner", {"budget": 5, **clip_opts(14 * SIDE)}, 1),  # the question's ids, to decode them
    ],
)
def test_selection_reads(method, opts, reads):
    """The selection reads nothing from the device (host sizes, a stable sort, scatters); CLIP relevance
    reads the question's token ids once."""
    from mmsink.tools.reads import DeviceReads

    model = llava(0)
    inputs = batch(LLAVA_PROMPTS, seed=3)
    mmsink.wrap(model, prune=method, **opts)
    try:
        with torch.no_grad(), DeviceReads() as r:
            model(**inputs)
    finally:
        mmsink.unwrap(model)
    assert sum(c for s, c in r.sites.items() if "divprune.py" in s or "cdpruner.py" in s) == reads, r.sites
