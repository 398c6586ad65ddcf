"""Several GPUs (skipped with fewer than two CUDA devices).

- A model whose decoder layers are split over two GPUs with ``device_map`` (what ``device_map="auto"``
  does to a model too big for one GPU) gives the same greedy tokens, kept tokens and FLOPs as the same
  weights on one GPU, for every kind of plan: layer-wise pruning, a shallow reweighting stage, VAR,
  ViT-sink forwarding, and beam search.
- Data-parallel ``mmsink eval`` over NCCL, one GPU per process, writes the single-process answers file.
"""

import pytest
import torch
from test_var import VAR
from test_vitsink import SINKS
from tiny import batch, prompt, tiny_llava
from transformers import LlavaForConditionalGeneration

import mmsink

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


def split_map(layers: int, first: int) -> dict:
    """Vision, embeddings and the first ``first`` decoder layers on GPU 0, the rest on GPU 1."""
    dm = {"model.vision_tower": 0, "model.multi_modal_projector": 0, "model.language_model.embed_tokens": 0}
    dm.update({"model.language_model.rotary_emb": 0, "model.language_model.norm": 1, "lm_head": 1})
    dm.update({f"model.language_model.layers.{i}": int(i >= first) for i in range(layers)})
    return dm


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llava(layers=8).save_pretrained(path)
    one = LlavaForConditionalGeneration.from_pretrained(path, device_map={"": 0}).eval()
    split = LlavaForConditionalGeneration.from_pretrained(path, device_map=split_map(8, 3)).eval()
    for m in (one, split):
        m.set_attn_implementation("sdpa")
    assert split.model.language_model.layers[7].self_attn.q_proj.weight.device.index == 1
    return one, split


CASES = [
    ("fastv", dict(budget=6)),
    ("pdrop", {}),
    ("dart", dict(budget=8)),
    ("visipruner", dict(budget=5)),
    ("visipruner", {}),  # adaptive
    ("fastv", dict(budget=6, var=VAR)),
    ("fastv", dict(budget=6, sink_forward=SINKS)),
]


@pytest.mark.parametrize("method,opts", CASES)
def test_split_model_matches_one_gpu(pair, method, opts):
    one, split = pair
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    out = []
    for m in (one, split):
        mmsink.wrap(m, prune=method, **opts)
        try:
            x = {k: v.to("cuda:0") for k, v in inputs.items()}
            with torch.no_grad():
                tokens = m.generate(**x, max_new_tokens=8, do_sample=False)
            st = mmsink.stats(m)
            out.append((tokens.cpu(), st.kept_tokens, st.prefill_flops))
        finally:
            mmsink.unwrap(m)
    (a, ka, fa), (b, kb, fb) = out
    assert torch.equal(a, b)
    assert ka == kb and fa == fb


def test_split_model_beam_search(pair):
    one, split = pair
    inputs = batch([prompt(5, 7, seed=3), prompt(2, 4, seed=4)])
    out = []
    for m in (one, split):
        mmsink.wrap(m, prune="fastv", budget=6)
        try:
            x = {k: v.to("cuda:0") for k, v in inputs.items()}
            with torch.no_grad():
                out.append(m.generate(**x, max_new_tokens=6, num_beams=3, do_sample=False).cpu())
        finally:
            mmsink.unwrap(m)
    assert torch.equal(out[0], out[1])


def test_two_gpu_processes_write_the_single_process_file(tmp_path):
    from test_eval import make_model

    from evals import eval as ev

    model = make_model(tmp_path / "model")
    argv = ["--model", str(model), "--bench", "synthvqa", "--scenes", "6", "--cache", str(tmp_path / "c")]
    argv += [
        "--prune",
        "fastv",
        "--budget",
        "16",
        "--max-new-tokens",
        "3",
        "--no-progress",
        "--device",
        "cuda",
    ]
    argv += ["--batch-size", "2"]
    assert ev.main(argv + ["--out", str(tmp_path / "one.jsonl")]) == 0
    assert ev.main(argv + ["--out", str(tmp_path / "two.jsonl"), "--num-processes", "2"]) == 0
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
