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
from tiny import batch, generate_each, prompt, split_map, tiny_llava
from transformers import LlavaForConditionalGeneration

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llava(layers=8).save_pretrained(path)
    one = LlavaForConditionalGeneration.from_pretrained(path, device_map={"": 0}).eval()
    split = LlavaForConditionalGeneration.from_pretrained(path, device_map=split_map(8, 3, 0, 1)).eval()
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
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    (a, sa), (b, sb) = generate_each(pair, inputs, method, opts, "cuda:0", max_new_tokens=8)
    assert torch.equal(a, b)
    assert sa.kept_tokens == sb.kept_tokens and sa.prefill_flops == sb.prefill_flops


def test_split_model_beam_search(pair):
    inputs = batch([prompt(5, 7, seed=3), prompt(2, 4, seed=4)])
    (a, _), (b, _) = generate_each(
        pair, inputs, "fastv", {"budget": 6}, "cuda:0", max_new_tokens=6, num_beams=3
    )
    assert torch.equal(a, b)


def test_two_gpu_processes_write_the_single_process_file(tmp_path):
    from mmsink.evals import eval as ev
    from test_eval import make_model

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


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("method,opts", [("fastv", dict(budget=6)), ("pdrop", {})])
def test_split_model_generate_fast(pair, method, opts, graphs):
    """generate_fast on layers split over two GPUs (no hand-off: tensors cross devices per layer; with
    graphs, one CUDA graph per GPU and the hidden state copied between them) gives the one-GPU model's
    greedy tokens."""
    import mmsink

    inputs = {k: v.to("cuda:0") for k, v in batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)]).items()}
    outs = []
    for model in pair:
        mmsink.wrap(model, prune=method, **opts)
        try:
            outs.append(mmsink.generate_fast(model, max_new_tokens=8, graphs=graphs, **inputs))
        finally:
            mmsink.unwrap(model)
    assert torch.equal(outs[0], outs[1])
