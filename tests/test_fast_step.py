"""generate_fast's decode-step options (``mmsink.fast.fuse.StepOptions``: fused projections, one KV write
with validity by position, the attention kernel): the tokens of greedy ``generate`` for pruned, padded
and VAR batches, the next-token logits of the model's own forward (fp32), weights that ``unwrap`` gives
back in their own storage, and the profile script's CPU path."""

import itertools
import json

import pytest
import torch
from test_var import VAR
from tiny import batch, prompt, qwen_batch, tiny_llava, tiny_qwen

import mmsink
from mmsink.fast import clear, fuse
from mmsink.fast.fuse import StepOptions

ALL = [
    StepOptions(f, w, a)
    for f, w, a in itertools.product([False, True], [False, True], fuse.ATTN)
    if not (w and a == "kernel")
][1:]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(autouse=True)
def unwrapped(llava):
    yield
    if llava.__dict__.get("_mmsink") is not None:
        mmsink.unwrap(llava)
    clear(llava)  # a bare model's decoders and fused weights


def decoder(model):
    return next(reversed(model.__dict__["_mmsink_decoders"].values()))  # the one used last


@pytest.mark.parametrize(
    "method,opts", [(None, {}), ("fastv", {"budget": 6}), ("pdrop", {}), ("visipruner", {})]
)
def test_tokens_of_generate(llava, method, opts):
    """Every option combination gives generate's tokens (left-padded batch; pruned layers hold holes)."""
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(3, 9, seed=3)])
    mmsink.wrap(llava, prune=method, **opts)
    ref = llava.generate(**inputs, max_new_tokens=10, do_sample=False)
    for step in ALL:
        out = mmsink.generate_fast(llava, max_new_tokens=10, compile=False, step=step, **inputs)
        assert torch.equal(out, ref), step


@pytest.mark.parametrize(
    "step", [StepOptions(fuse=True, write=True, attn="matmul"), StepOptions(attn="reduce")]
)
def test_next_logits_of_the_models_forward(llava, step):
    """After n tokens, one more step's logits equal the model's own forward over prompt + those tokens
    (fp32), as the plain step's do; the options' and the plain step's agree more closely still."""
    inputs = batch([prompt(5, 7, seed=4), prompt(2, 4, seed=5)])
    n = 6
    logits = {}
    for s in (None, step):
        out = mmsink.generate_fast(llava, max_new_tokens=n, compile=False, step=s, **inputs)
        dec = decoder(llava)
        h, cos, sin, t = dec.start_op()  # feeds the n-th new token: the logits of the (n + 1)-th
        logits[s] = dec.head(dec.norm(dec.layers_op(0, len(dec.layers), h, cos, sin, t)[0]))[:, -1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, n, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        ref = llava(
            input_ids=out, attention_mask=mask, position_ids=pos, pixel_values=inputs["pixel_values"]
        ).logits[:, -1]
    assert torch.allclose(logits[None], ref, atol=1e-4), (logits[None] - ref).abs().max()
    assert torch.allclose(logits[step], ref, atol=1e-4), (logits[step] - ref).abs().max()
    assert torch.allclose(logits[step], logits[None], atol=1e-5)


def test_fused_weights_share_storage_and_come_back(llava):
    """Fusing moves q/k/v and gate/up into one tensor each (the modules' weights become its slices, so the
    parameters' storage does not grow), generate still gives the same tokens through the fused modules;
    unwrap gives every weight its own storage with the same values."""
    before = {k: v.clone() for k, v in llava.state_dict().items()}

    def size():
        return sum(
            {
                p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in llava.parameters()
            }.values()
        )

    nbytes = size()
    inputs = batch([prompt(5, 7, seed=6), prompt(2, 4, seed=7)])
    mmsink.wrap(llava, prune="fastv", budget=6)  # unwrap below: also for a wrapped model
    ref = llava.generate(**inputs, max_new_tokens=8, do_sample=False)
    mmsink.generate_fast(llava, max_new_tokens=8, compile=False, step={"fuse": True}, **inputs)
    attn = llava.model.language_model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    assert size() == nbytes
    assert torch.equal(llava.generate(**inputs, max_new_tokens=8, do_sample=False), ref)
    mmsink.unwrap(llava)
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.v_proj.weight.untyped_storage().data_ptr()
    assert attn.q_proj.weight.untyped_storage().nbytes() == attn.q_proj.weight.numel() * 4
    after = llava.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unchanged_weights_skip_the_full_check(llava, monkeypatch):
    """A prefill after the first compares the stamp only: the full check (a slice per weight on every
    layer) cost more host time than the GPU work after a selection on a 7B model; a replaced weight brings
    it back (the test below checks what it then finds)."""
    inputs = batch([prompt(5, 7, seed=8)])
    step = StepOptions(fuse=True)
    full = []
    real = fuse.groups
    monkeypatch.setattr(fuse, "groups", lambda layer: full.append(layer) or real(layer))
    try:
        mmsink.generate_fast(llava, max_new_tokens=2, compile=False, step=step, **inputs)
        first = len(full)
        mmsink.generate_fast(llava, max_new_tokens=2, compile=False, step=step, **inputs)
        assert first > 0 and len(full) == first
        proj = llava.model.language_model.layers[0].self_attn.q_proj
        proj.weight = torch.nn.Parameter(proj.weight.detach().clone())
        mmsink.generate_fast(llava, max_new_tokens=2, compile=False, step=step, **inputs)
        assert len(full) > first
    finally:
        clear(llava)


@pytest.mark.parametrize("how", ["parameter", "data", "module"])
def test_replaced_weights_are_fused_again(llava, how):
    """A weight replaced after fusing (a new Parameter, new storage under the same Parameter, a new
    module) is seen by the next call, whose check reads the modules' dicts (``fuse.stamp``): the step
    reads the new weight, not the stale joint tensor (that would give the old model's tokens)."""
    inputs = batch([prompt(5, 7, seed=8), prompt(2, 4, seed=9)])
    step = StepOptions(fuse=True)
    old = mmsink.generate_fast(llava, max_new_tokens=8, compile=False, step=step, **inputs)
    layers = llava.model.language_model.layers
    parents = [(layers[1].self_attn, "k_proj"), (layers[2].mlp, "up_proj")]
    keep = [(getattr(p, n), getattr(p, n).weight) for p, n in parents]
    try:
        for (p, n), (m, w) in zip(parents, keep):
            if how == "parameter":
                m.weight = torch.nn.Parameter(w.detach() * -3.0)
            elif how == "data":
                m.weight.data = w.detach() * -3.0
            else:
                new = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                new.weight = torch.nn.Parameter(w.detach() * -3.0)
                setattr(p, n, new)
        ref = llava.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert not torch.equal(ref, old)  # the change matters for this model
        out = mmsink.generate_fast(llava, max_new_tokens=8, compile=False, step=step, **inputs)
        assert torch.equal(out, ref)
    finally:
        clear(llava)
        for (p, n), (m, w) in zip(parents, keep):
            m.weight = torch.nn.Parameter(w.detach().clone())
            setattr(p, n, m)


@pytest.mark.parametrize(
    "step", [StepOptions(fuse=True, write=True, attn="matmul"), StepOptions(True, False, "kernel")]
)
def test_var_layers_keep_the_plain_step(llava, step):
    """VAR's layers between the step's: the next layer's input norm is made again after each."""
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    mmsink.wrap(llava, prune="fastv", budget=6, var=VAR)
    ref = llava.generate(**inputs, max_new_tokens=10, do_sample=False)
    out = mmsink.generate_fast(llava, max_new_tokens=10, compile=False, graphs=False, step=step, **inputs)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "step",
    [StepOptions(fuse=True, write=True, attn="reduce"), StepOptions(fuse=True), StepOptions(attn="kernel")],
)
def test_qwen_biases_and_mrope(step):
    """Qwen2-VL: q/k/v with biases (fused with them), 3-D positions (rotated by the kernels' reference
    with attn="kernel"), GQA."""
    model = tiny_qwen()
    inputs, _ = qwen_batch([(4, 6, [(8, 12)]), (2, 3, [(4, 8)]), (3, 5, [])], seed=1)
    mmsink.wrap(model, prune="fastv", budget=4)
    ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    out = mmsink.generate_fast(model, max_new_tokens=8, compile=False, graphs=False, step=step, **inputs)
    assert model.model.language_model.layers[0].self_attn.q_proj.bias is not None
    assert torch.equal(out, ref)


def test_bad_options(llava):
    inputs = batch([prompt(2, 3, seed=1)])
    with pytest.raises(ValueError, match="step attn must be one of"):
        mmsink.generate_fast(llava, max_new_tokens=2, step={"attn": "flash"}, **inputs)
    with pytest.raises(ValueError, match="unknown step option"):
        mmsink.generate_fast(llava, max_new_tokens=2, step={"fused": True}, **inputs)
    with pytest.raises(ValueError, match="writes the key, value and validity itself"):
        mmsink.generate_fast(llava, max_new_tokens=2, step={"write": True, "attn": "kernel"}, **inputs)
    mmsink.wrap(llava, kv={"window": 16, "sinks": 2})
    with pytest.raises(ValueError, match="do not apply to the kv window mode"):
        mmsink.generate_fast(llava, max_new_tokens=2, step={"fuse": True}, **inputs)


def test_fused_step_is_the_default_on_one_gpu_only(llava, monkeypatch):
    """step=None: the fused step where graphs and compile run on one GPU (tests/test_gpu_step_options.py
    runs it on CUDA), with the decode kernels where Triton imports; the plain one elsewhere; ``{}`` is the
    plain step everywhere."""
    kernel = "kernel" if fuse.decode_kernel.triton is not None else "sdpa"
    gemv = fuse.gemv.triton is not None
    assert fuse.default_options(None, True) == StepOptions(fuse=True, attn=kernel, gemv=gemv)
    monkeypatch.setenv("MMSINK_DECODE_KERNEL", "0")
    assert fuse.default_options(None, True) == StepOptions(fuse=True, gemv=gemv)
    monkeypatch.setenv("MMSINK_GEMV_KERNEL", "0")
    assert fuse.default_options(None, True) == StepOptions(fuse=True)
    assert fuse.default_options(None, False) is None and fuse.default_options({}, True) is None
    assert fuse.default_options({"attn": "reduce"}, True) == StepOptions(attn="reduce")
    mmsink.generate_fast(llava, max_new_tokens=3, **batch([prompt(2, 3, seed=1)]))
    assert fuse.FUSED not in llava.__dict__  # the CPU: weights untouched


def test_profile_script_cpu(tmp_path, monkeypatch):
    """evals/profile_decode.py --tiny: every configuration gives base's tokens; the CPU profile counts one
    projection operator per layer fewer for q/k/v and for gate/up each when fused. Its steps run with
    autograd off: with it on, each step's graph hung on the KV buffers (written in place from weights that
    require grad) and kept every earlier step's saved tensors alive (the H200 ran out of memory)."""
    from mmsink.evals import profile_decode

    from mmsink.fast.decode import FastDecoder

    steps = []  # (grad enabled, decoder) of every step the script runs outside a CUDA graph
    plain_step = FastDecoder.step

    def step(self):
        steps.append((torch.is_grad_enabled(), self))
        return plain_step(self)

    monkeypatch.setattr(FastDecoder, "step", step)
    res = profile_decode.main(
        [
            "--tiny",
            "--configs",
            "base,fuse,write+matmul",
            "--steps",
            "2",
            "--reps",
            "1",
            "--bench-tokens",
            "1",
            "--out",
            str(tmp_path),
        ]  # fmt: skip
    )
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(saved["configs"]) == {"base", "fuse", "write+matmul"}
    md = next(tmp_path.glob("*.md")).read_text()
    assert md.startswith("Command: `python evals/profile_decode.py --tiny") and "## decode step" in md
    assert saved["complete"] and saved["stage"] == "done" and "Partial run" not in md
    assert saved["profile_steps"] == 2 and not list(tmp_path.glob("*.tmp*"))
    layers = profile_decode.SHAPES[profile_decode.TINY]["text"]["num_hidden_layers"]
    rows = res["configs"]
    assert all(r["same_tokens_as_base"] for r in rows.values())
    gemm = {k: r["profile"]["plain"]["categories"]["gemv/gemm"]["kernels"] for k, r in rows.items()}
    assert gemm["base"] - gemm["fuse"] == 3 * layers
    assert res["memory"]["storage_bytes_after"] == res["memory"]["storage_bytes_before"]
    assert rows["write+matmul"]["kv_bytes"] == rows["base"]["kv_bytes"]  # one buffer for k and v, not more
    assert steps and not any(grad for grad, _ in steps)
    decoders = {id(d): d for _, d in steps}.values()
    assert len(decoders) == 3 and not any(t.requires_grad for d in decoders for t in d.k + d.v)


class Cut(Exception):
    """What a timeout's kill does to the script, raised where a test chooses."""


@pytest.mark.parametrize("where", ["timing", "second profile"])
def test_profile_script_keeps_what_it_measured_when_cut(where, tmp_path, monkeypatch):
    """evals/profile_decode.py writes its JSON + Markdown after every stage: cut in the first timing
    call (right after the capture) the files say stage ``captured`` with no rows; cut in the second
    configuration's profile they hold every configuration's timing (medians of the 2 reps, ratios to
    base) and base's profile, ``complete`` false, the Markdown marked partial."""
    from mmsink.evals import profile_decode

    if where == "timing":

        def clock_for(cuda):
            def clock(fn):
                raise Cut

            return clock

        monkeypatch.setattr(profile_decode, "clock_for", clock_for)
    else:
        kernels, calls = profile_decode.kernels, []

        def cut_kernels(fn, n, cuda):
            calls.append(n)
            if len(calls) > 1:  # one mode (plain) per configuration on the CPU: the second configuration
                raise Cut
            return kernels(fn, n, cuda)

        monkeypatch.setattr(profile_decode, "kernels", cut_kernels)
    argv = ["--tiny", "--configs", "base,fuse", "--steps", "3", "--reps", "2", "--bench-tokens", "1"]
    with pytest.raises(Cut):
        profile_decode.main(argv + ["--out", str(tmp_path)])
    (path,) = tmp_path.glob("*.json")
    saved = json.loads(path.read_text())
    md = next(tmp_path.glob("*.md")).read_text()
    assert not saved["complete"] and "Partial run" in md and not list(tmp_path.glob("*.tmp*"))
    if where == "timing":
        assert saved["stage"] == "captured" and saved["configs"] == {} and "No timing yet" in md
        return
    assert saved["stage"] == "profiled base" and set(saved["configs"]) == {"base", "fuse"}
    base, fuse = saved["configs"]["base"], saved["configs"]["fuse"]
    assert base["reps_done"] == fuse["reps_done"] == 2 and base["ratio"]["plain"] == 1.0
    assert fuse["ratio"]["plain"] == pytest.approx(fuse["step_ms"]["plain"] / base["step_ms"]["plain"], 1e-3)
    assert set(base["profile"]) == {"plain"} and "profile" not in fuse and calls == [3, 3]
    assert "| base | 2 |" in md and "| fuse | 2 |" in md and "| base | plain |" in md
    assert "| fuse | plain |" not in md


@pytest.mark.gpu
@pytest.mark.parametrize(
    "step",
    [
        StepOptions(fuse=True, write=True, attn="matmul"),
        StepOptions(fuse=True, write=True, attn="reduce"),
        StepOptions(write=True),
        StepOptions(fuse=True, attn="kernel"),
    ],
)
@pytest.mark.parametrize("method,opts", [(None, {}), ("fastv", {"budget": 6})])
def test_cuda_graphed_compiled_step_options(step, method, opts):
    """On CUDA (fp32), compiled and captured as one graph per token: generate's tokens, also when the
    prefill tail is captured and replayed (second and third call)."""
    model = tiny_llava().cuda()
    inputs = {k: v.cuda() for k, v in batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)]).items()}
    if method is not None:
        mmsink.wrap(model, prune=method, **opts)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    for _ in range(3):
        out = mmsink.generate_fast(model, max_new_tokens=12, graphs=True, step=step, **inputs)
        assert torch.equal(out, ref)
