"""A sample's prefill FLOPs do not depend on what it was batched with: padding is nobody's compute, and
a sample is charged the selection work it would run alone (issue 22: the same question differed by 1,536
FLOPs between eval batch sizes 8 and 3)."""

import json

import pytest
import torch
from tiny import (
    batch,
    next_batch,
    next_single,
    pixels_of,
    prompt,
    qwen_batch,
    qwen_single,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen,
)

import mmsink

METHODS = [
    ("fastv", 0.5),
    ("pdrop", 0.5),
    ("dart", 0.5),
    ("visipruner", 0.5),
    ("visipruner", None),
    ("visionzip", 0.5),
    ("random", 0.5),
    ("pool", 0.5),
    ("none", None),
]


def llava_case(images=(1, 1, 1, 1)):
    model = tiny_llava(layers=8)
    shapes = [(3, 5), (3, 30), (2, 9), (3, 2)]
    prompts = [prompt(a, b, images=k, seed=i) for i, ((a, b), k) in enumerate(zip(shapes, images))]
    inputs = batch(prompts)

    def single(i):
        one = batch([prompts[i]])
        pix = pixels_of(inputs, prompts, i)
        one["pixel_values"] = pix if len(pix) else None  # a prompt without images
        return one

    return model, inputs, single, len(prompts)


def next_case(images=(1, 1, 1, 1)):
    model = tiny_llava_next(layers=8)
    shapes = [(3, 5, [(28, 56), (56, 28)]), (3, 25, [(56, 56)]), (2, 9, [(56, 28)]), (4, 2, [(28, 28)] * 2)]
    specs = [(a, b, imgs[:k]) for (a, b, imgs), k in zip(shapes, images)]
    inputs, _ = next_batch(model, specs)
    return model, inputs, lambda i: next_single(inputs, specs, i), len(specs)


def qwen_case(images=(1, 1, 1, 1)):
    model = tiny_qwen(layers=8)
    shapes = [(3, 5, [(4, 6), (2, 2)]), (3, 25, [(6, 6)]), (2, 9, [(2, 4)]), (4, 2, [(4, 4), (4, 2)])]
    specs = [(a, b, imgs[:k]) for (a, b, imgs), k in zip(shapes, images)]
    inputs, _ = qwen_batch(specs)
    return model, inputs, lambda i: qwen_single(inputs, specs, i), len(specs)


CASES = {"llava": llava_case, "llava_next": next_case, "qwen2_vl": qwen_case}
# samples holding two, one and no images (DART's per-image pass, VisionZip's rows, the vision stage's share)
MIXED = (2, 1, 0, 2)


def sample_flops(model, inputs, method, budget):
    mmsink.wrap(model, prune=method, budget=budget)
    try:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
        s = mmsink.stats(model)
        return s.extra["sample_prefill_flops"], s.extra["sample_baseline_prefill_flops"]
    finally:
        mmsink.unwrap(model)


@pytest.mark.parametrize("images", [None, MIXED], ids=["one-image-each", "two-one-none"])
@pytest.mark.parametrize("family", list(CASES))
def test_sample_flops_equal_the_sample_alone(family, images):
    """Prompts (and NeXT / Qwen images) of different sizes: ragged padding; one image a sample, or two, one
    and none. Exact for every method: selection work a sample alone would not run the same way (PDrop's
    and DART's scores over its own slots and images, VisiPruner's tests while it waits itself, VisionZip's
    merge over its own rows, Qwen's received-attention scores per image) is counted per sample by the
    pruner (or family); the rest is linear in what each sample brings."""
    model, inputs, single, n = CASES[family]() if images is None else CASES[family](MIXED)
    bad = []
    for method, budget in METHODS:
        batched, batched_base = sample_flops(model, inputs, method, budget)
        for i in range(n):
            alone, alone_base = sample_flops(model, single(i), method, budget)
            assert batched_base[i] == alone_base[0]
            if batched[i] != alone[0]:
                bad.append((method, budget, i, batched[i] - alone[0], alone[0]))
    assert bad == [], "\n".join(map(str, bad))


def test_eval_flops_do_not_depend_on_the_batch(model_dir, cache, tmp_path):
    """The issue's case: the same eval at batch size 8 and 3 writes the same per-sample FLOPs."""
    from mmsink.evals import eval as ev

    for bs in (8, 3):
        argv = ["--model", str(model_dir), "--bench", "synthvqa", "--scenes", "4", "--cache", str(cache)]
        argv += [
            "--limit",
            "8",
            "--max-new-tokens",
            "1",
            "--no-progress",
            "--prune",
            "fastv",
            "--budget",
            "8",
        ]
        assert ev.main(argv + ["--batch-size", str(bs), "--out", str(tmp_path / f"b{bs}.jsonl")]) == 0
    a, b = (
        [json.loads(x)["metadata"] for x in (tmp_path / f"b{bs}.jsonl").read_text().splitlines()]
        for bs in (8, 3)
    )
    assert len(a) == len(b) == 8
    assert len({m["prefill_flops"] for m in a}) > 1  # questions of different lengths: padding in the batch
    assert [m["prefill_flops"] for m in a] == [m["prefill_flops"] for m in b]


def test_kept_tokens_are_labelled_and_the_final_count_given(model_dir, cache, tmp_path, capsys):
    """'mean kept visual tokens 67' for fastv at budget 4 read as the budget ignored: it is a mean over
    layers; the count after the last pruning step is given beside it (answers, summary, sweep table)."""
    from mmsink.evals import sweep

    out = tmp_path / "s"
    argv = ["--model", str(model_dir), "--bench", "synthvqa", "--scenes", "4", "--cache", str(cache)]
    argv += ["--limit", "3", "--max-new-tokens", "1", "--no-progress", "--opt", "k=1"]
    assert sweep.main(argv + ["--methods", "fastv", "--budgets", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    meta = [json.loads(x)["metadata"] for x in (out / "fastv-4.jsonl").read_text().splitlines()]
    layers = 4  # test_eval.LAYERS
    assert all(m["kept_tokens_final"] == 4 and m["kept_tokens"] == (256 + 3 * 4) / layers for m in meta)
    assert "(mean over layers), 4.00 after the last pruning step" in printed.out
    table = (out / "sweep.md").read_text()
    assert "visual tokens (mean over layers) | after last pruning |" in table
    row = [x for x in table.splitlines() if x.startswith("| fastv-4 |")][0].split("|")
    header = [x for x in table.splitlines() if x.startswith("| run |")][0].split("|")
    assert len(row) == len(header) and row[-3].strip() == "4.0" and row[-4].strip() == "67.0"
    summary = json.loads((out / "sweep.json").read_text())["runs"][0]
    assert summary["mean_kept_tokens_final"] == 4
