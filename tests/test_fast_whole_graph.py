"""The compiled layer functions of ``generate_fast`` trace as one graph each (``torch.compile(...,
dynamic=True)``, as the decoders compile them): with the head counts symbolic, a comparison of them handed
to SDPA as ``enable_gqa`` is a symbolic bool SDPA refuses, and dynamo broke the graph at the attention (the
prefill tail's layer then ran as two graphs with the attention eager between them). Each function's output
equals its eager run."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from mmsink.fast import decode as fd


def parts(kv_heads: int, n: int = 12, b: int = 2, cap: int = 32):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=kv_heads
    )
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).eval()
    h = torch.randn(b, n, 64)
    cos, sin = LlamaRotaryEmbedding(cfg)(h, torch.arange(n)[None].expand(b, -1))
    kb, vb = torch.zeros(b, kv_heads, cap, 16), torch.zeros(b, kv_heads, cap, 16)
    return layer, h, cos, sin, kb, vb


def compiled(fn):
    torch._dynamo.reset()
    counter = CompileCounter()
    return torch.compile(fn, backend=counter, dynamic=True), counter


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_layer_prefill_is_one_graph(kv_heads):
    layer, h, cos, sin, kb, vb = parts(kv_heads)
    fn, counter = compiled(fd.layer_prefill)
    with torch.no_grad():
        want = fd.layer_prefill(
            layer, h, cos, sin, kb.clone(), vb.clone(), None, 4, kv_heads, apply_rotary_pos_emb
        )
        got = fn(layer, h, cos, sin, kb, vb, None, 4, kv_heads, apply_rotary_pos_emb)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_layer_step_is_one_graph(kv_heads):
    layer, h, cos, sin, kb, vb = parts(kv_heads, n=1)
    ok = torch.zeros(2, kb.shape[2], dtype=torch.bool)
    ok[:, :5] = True
    kb.normal_(), vb.normal_()
    slot = torch.tensor([5])
    fn, counter = compiled(fd.layer_step)
    with torch.no_grad():
        args = (layer, h, cos, sin)
        want = fd.layer_step(
            *args, kb.clone(), vb.clone(), ok.clone(), slot, 4, kv_heads, apply_rotary_pos_emb
        )
        got = fn(*args, kb, vb, ok, slot, 4, kv_heads, apply_rotary_pos_emb)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want)


def test_generate_fast_compiles_without_graph_breaks(monkeypatch):
    """Every function ``generate_fast`` compiles (the tail's layer, the plain and the fused step with SDPA)
    traces without a break, through dynamo alone (a backend that runs the graph as traced: the break is
    dynamo's), with the head counts and sizes constant (``test_compiled_layers_see_static_head_sizes``)."""
    import functools

    from torch._dynamo.utils import counters

    import mmsink
    from mmsink.tools.bench import bench_inputs, build

    nodes = []
    backend = functools.partial(record_nodes, nodes)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    counters.clear()
    model = build("tiny-cpu")
    model.generation_config.eos_token_id = None
    inputs, _ = bench_inputs(model, 2, 5, 4)
    mmsink.wrap(model, prune="fastv", budget=16)
    for step in (None, {"fuse": True, "attn": "sdpa"}):
        mmsink.generate_fast(model, max_new_tokens=3, graphs=False, compile=True, step=step, **inputs)
    assert not counters["graph_break"], dict(counters["graph_break"])
    seen = heads(nodes)
    assert len({name for name, _, _ in seen}) > 10
    symbolic = [s for s in seen if symbols(s[1]) or symbols(s[2])]
    assert not symbolic, symbolic


def record_nodes(nodes, gm, example_inputs):
    """A dynamo backend running the graph as traced, recording (op, name, example value) of its nodes."""
    nodes.extend((n.op, n.name, n.meta.get("example_value")) for n in gm.graph.nodes)
    return gm.forward


def traced_nodes(fn, *args) -> list:
    """``record_nodes`` over ``fn``'s dynamo graph, traced with ``dynamic=True`` as decoders compile it."""
    import functools

    nodes = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=functools.partial(record_nodes, nodes), dynamic=True)(*args)
    return nodes


def heads(nodes) -> list:
    """(name, dim 1, dim 3) of every floating [B, heads, n, d] value the graph makes."""
    return [
        (name, x.shape[1], x.shape[3])
        for op, name, x in nodes
        if op == "call_function" and isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point()
    ]


def symbols(v) -> set:
    """A size's free symbols, after what the trace has since pinned (an input's size equated with a
    constant): none for a constant."""
    return set() if isinstance(v, int) else set(v.node.shape_env.replace(v.node.expr).free_symbols)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_compiled_layers_see_static_head_sizes(kv_heads):
    """Compiled with ``dynamic=True`` the head counts passed in are symbolic; a head size derived from them
    (hidden / heads) made every element-wise kernel of the layer (rotary, the buffer copies, the SiLU gate)
    index through runtime divisions, with no wide loads on a GPU. Only batch, tokens and slots may vary."""
    layer, h, cos, sin, kb, vb = parts(kv_heads)
    rope = apply_rotary_pos_emb
    ok, slot = torch.ones(2, kb.shape[2], dtype=torch.bool), torch.tensor([5])
    for fn, args in (
        (fd.layer_prefill, (layer, h, cos, sin, kb, vb, None, 4, kv_heads, rope)),
        (fd.layer_step, (layer, h[:, :1], cos[:, :1], sin[:, :1], kb, vb, ok, slot, 4, kv_heads, rope)),
    ):
        seen = heads(traced_nodes(fn, *args))
        assert seen, fn.__name__
        symbolic = [s for s in seen if symbols(s[1]) or symbols(s[2])]
        assert not symbolic, (fn.__name__, symbolic)


def test_compiled_prefill_with_joint_weights_varies_only_in_batch_tokens_and_slots():
    """With the joint q / k / v and gate / up weights (``fuse.fused``: plain tensors, so symbolic under
    ``dynamic=True``), every value of the traced layer has sizes in batch, tokens and buffer slots only:
    the gate / up split at the modules' sizes pins the joint rows (halves of a symbolic row count did not,
    and the activation's kernel indexed through divisions)."""
    from mmsink.fast import fuse

    layer, h, cos, sin, kb, vb = parts(2, b=3)  # a batch unlike any other size (no duck-sized symbol shared)
    attn, mlp = layer.self_attn, layer.mlp
    joint = {
        "qkv": fuse.join([attn.q_proj, attn.k_proj, attn.v_proj]),
        "gu": fuse.join([mlp.gate_proj, mlp.up_proj]),
    }
    args = (layer, h, cos, sin, kb, vb, None, 4, 2, apply_rotary_pos_emb, None, joint)
    nodes = traced_nodes(fd.layer_prefill, *args)
    inputs = {name: x for op, name, x in nodes if op == "placeholder"}
    h_in = next(x for name, x in inputs.items() if name.lower().startswith("l_h_"))
    kb_in = next(x for name, x in inputs.items() if name.lower().startswith("l_kb_"))
    allowed = symbols(h_in.shape[0]) | symbols(h_in.shape[1]) | symbols(kb_in.shape[2])
    tensors = [(name, x) for op, name, x in nodes if op == "call_function" and isinstance(x, torch.Tensor)]
    assert len(tensors) > 20
    extra = [(name, tuple(x.shape)) for name, x in tensors if set().union(*map(symbols, x.shape)) - allowed]
    assert not extra, extra
