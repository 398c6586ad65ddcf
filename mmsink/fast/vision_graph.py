"""The vision tower as CUDA graphs (LLaVA-1.5, LLaVA-NeXT), used by ``generate_fast``.

A CLIP / SigLIP tower runs ~24 layers of small kernels on a few hundred tokens per tile: at batch 1 it
is bound by launching them (~350 launches and HF's Python per call), and its shapes depend only on the
pixel tensor's shape. So it is captured once per input signature and replayed. The hidden states the
model reads (``vision_feature_layer``) come back cloned out of the graph's memory; the last hidden state
and the pooled output, which it does not read, uncopied (valid until the next replay).

The captured call runs the encoder's layers only up to the deepest one the model reads (LLaVA reads
``hidden_states[-2]``: 23 of CLIP-L's 24 layers) and takes those layers' outputs by forward hooks instead
of ``output_hidden_states``, so the graph's pool holds the picked hidden states, not all of them. A
truncated call's ``last_hidden_state`` and ``pooler_output`` come back None (the layers they depend on did
not run; LLaVA and LLaVA-NeXT read neither); the call runs every layer when a tap sits past the cut.

Hooks a pruner placed inside the tower (VisionZip's query / key taps) cannot run during a replay: their
modules' outputs are captured as extra graph outputs and the hooks are called with them after each
replay, so the pruner sees what an eager run gives it.

``compile`` (``generate_fast``'s ``compile``): the captured call runs each encoder layer through one
``torch.compile`` of the layer's forward, shared by the layers (one graph for all of a tower's layers at a
shape), inside the graph. The layers are switched to it only during the call (their ``forward`` set on
the instance, removed after), so the model is left as it was. A layer holding a hooked module (VisionZip's
query / key taps) runs eagerly, so its hooks see their outputs as they do now; hooks on a layer itself
run around its compiled forward. Transformers' output recorders inside a layer (inactive unless outputs
such as attentions are collected) are set aside for the compiled call. A compiler failure warns once and
the tower's layers run eagerly.

``compiled_blocks``: the same for a tower that is not graphed (Qwen2-VL's: its attention splits the images
on the host, a graph break), with hooks that every block has at the same place (the family's attention
counter) traced into the blocks' graphs; a block holding a hook of its own (a pruner's tap) runs eagerly.

``launch``: ``generate_fast`` replays the tower's graph as the first thing of a prefill (from the
pixels, as the family computes the tower's input), so the host's work before the tower (the layout,
the model's prologue, the embeddings) runs while the GPU runs the tower; the tower's call in the
forward then takes that replay's outputs.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections import OrderedDict

import torch
from torch import nn

from ..core import graphs
from ..core.compiling import or_eager
from ..core.graphs import load, signature, static
from .decode import first_parameter

STORE = "_mmsink_vision_graphs"
KEEP = 4


class CompiledLayers:
    """A tower's layers through one ``torch.compile`` of ``layer_forward`` while switched (``switched``);
    the compiler state is kept: its first failure warns and turns the layers eager from then on."""

    def __init__(self, fullgraph: bool = True, trace_hooks: bool = False):
        self.fullgraph = fullgraph  # False: graph breaks allowed (Qwen's attention splits on the host)
        self.trace_hooks = trace_hooks  # hooks inside a layer traced into its graph, not a reason for eager
        self.compiled = None  # torch.compile(layer_forward), made at first use
        self.failed = False  # the compiler failed once: layers run eagerly from then on
        self.compiled_calls = 0  # layer calls that went through ``compiled``

    def traceable(self, layer) -> bool:
        """With ``trace_hooks``: whether the hooks inside ``layer`` are those of every switched layer (the
        same functions at the same places, e.g. a family's per-attention counter), traced into the one
        graph; a hook of one layer alone (a pruner's tap) makes it eager."""
        if not self.trace_hooks:
            return False
        return hook_map(layer) == self.uniform

    @contextlib.contextmanager
    def switched(self, blocks):
        """Inside the block the layers run ``run_layer`` (an instance ``forward``, removed on the way out).
        A layer whose forward or call is set already (the user's own) is left as it is."""
        maps = [hook_map(b) for b in blocks]
        self.uniform = maps[0] if maps and all(m == maps[0] for m in maps) else min(maps, key=len, default={})
        out = []
        try:
            for b in blocks:
                if "forward" in b.__dict__ or getattr(b, "_compiled_call_impl", None) is not None:
                    continue
                b.__dict__["forward"] = functools.partial(self.run_layer, b)
                out.append(b)
            yield
        finally:
            for b in out:
                del b.__dict__["forward"]

    def run_layer(self, layer, *args, **kwargs):
        """``layer``'s own forward through the compiled function. Eager: a layer holding a hooked module (the
        compiled forward would trace its hooks: a second graph for that layer, hooks run at trace time),
        under a torch function or dispatch mode (which the compiler refuses or traces), after a compiler
        failure."""
        modes = torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack()
        if self.failed or modes or torch.compiler.is_compiling() or recording():
            return layer_forward(layer, *args, **kwargs)
        if any(hooked(m) for m in layer.modules() if m is not layer) and not self.traceable(layer):
            return layer_forward(layer, *args, **kwargs)
        if self.compiled is None:
            self.compiled = torch.compile(layer_forward, fullgraph=self.fullgraph)
        # transformers' recorders inside the layer (inactive: ``recording``) set aside for the call; the
        # compiler cannot trace them (they read a ContextVar)
        inside = [m for m in layer.modules() if m is not layer and (m._forward_hooks or m._forward_pre_hooks)]
        kept = [(m.__dict__["_forward_hooks"], m.__dict__["_forward_pre_hooks"]) for m in inside]
        for m, hooks in zip(inside, kept):
            m.__dict__["_forward_hooks"], m.__dict__["_forward_pre_hooks"] = map(others, hooks)
        try:
            what = "the vision tower's layers"
            out = or_eager(self, self.compiled, layer_forward, (layer, *args), kwargs, what, "compile=False")
        finally:
            for m, (post, pre) in zip(inside, kept):
                m.__dict__["_forward_hooks"], m.__dict__["_forward_pre_hooks"] = post, pre
        if not self.failed:
            self.compiled_calls += 1
        return out


class GraphedTower(CompiledLayers):
    """Replaces the tower's ``forward`` while ``generate_fast`` prefills; one graph per signature."""

    def __init__(self, layers: tuple, taps: list, capture=graphs.capture, encoder=None, compile=False):
        self.layers, self.taps, self.capture = layers, taps, capture  # taps: [(module, hook)]
        self.encoder = encoder  # a module running ``encoder.layers`` in turn, or None: output_hidden_states
        super().__init__()
        self.compile = compile  # the encoder's layers through ``compiled`` (needs ``encoder``)
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.forward = None  # the tower's own forward, set per call (``patched``)
        self.captures = 0
        self.launched = None  # the key of the graph ``launch`` replayed, until the tower's call

    def cut(self) -> int:
        """How many encoder layers a call runs: through the deepest one read (hidden state ``i`` is layer
        ``i``'s output, 0 the first layer's input), or all when a tap lies outside the layers run."""
        blocks = self.encoder.layers
        n = len(blocks)
        cut = max(1, max(i % (n + 1) for i in self.layers))
        inside = {id(m) for b in blocks[:cut] for m in b.modules()}
        return cut if all(id(m) in inside for m, _ in self.taps) else n

    def _run(self, args, kwargs) -> tuple:
        """(output type, [last hidden state, pooler output, *picked hidden states, *tap outputs])."""
        grab = [None] * len(self.taps)
        handles = [
            module.register_forward_hook(lambda m, a, o, i=i: grab.__setitem__(i, o))
            for i, (module, _) in enumerate(self.taps)
        ]
        try:
            if self.encoder is None:
                out = self.forward(*args, **kwargs)
                hs = out.hidden_states
                keep = {i % len(hs) for i in self.layers}
                picked = [h if i in keep else None for i, h in enumerate(hs)]
                ends = [out.last_hidden_state, getattr(out, "pooler_output", None)]
            else:
                out, picked, whole = self._truncated(args, kwargs)
                # a cut encoder's output is not the tower's: neither it nor what is pooled from it is kept
                ends = [out.last_hidden_state, getattr(out, "pooler_output", None)] if whole else [None] * 2
        finally:
            for h in handles:
                h.remove()
        return type(out), [*ends, *picked, *grab]

    def _truncated(self, args, kwargs) -> tuple:
        """The tower's forward with the encoder's layers cut after ``cut()`` (restored after the call) and
        the read hidden states taken by hooks: (output, [hidden state or None] * (layers + 1), whether
        every layer ran)."""
        enc = self.encoder
        blocks = enc.layers
        n, cut = len(blocks), self.cut()
        picked = [None] * (n + 1)
        handles = []
        for i in sorted({i % (n + 1) for i in self.layers}):
            if i == 0:  # what transformers records as hidden_states[0]: the first layer's input
                hook = blocks[0].register_forward_pre_hook(lambda m, a: picked.__setitem__(0, a[0]))
            else:
                hook = blocks[i - 1].register_forward_hook(
                    lambda m, a, o, i=i: picked.__setitem__(i, o[0] if isinstance(o, tuple) else o)
                )
            handles.append(hook)
        if cut < n:
            enc.layers = nn.ModuleList(blocks[:cut])  # the same layer modules, the tail left out
        try:
            with self.switched(blocks[:cut]) if self.compile else contextlib.nullcontext():
                out = self.forward(*args, **{**kwargs, "output_hidden_states": False})
        finally:
            enc.layers = blocks
            for h in handles:
                h.remove()
        return out, picked, cut == n

    def ready(self, x):
        """The key of the graph a call on ``x`` (the tower's one positional input) would replay, the last
        one used, or None (not captured yet; a graph whose keyword arguments hold tensors needs them too)."""
        want = signature((x,))
        return next(
            (k for k in reversed(self.graphs) if k[0] == want and k[2] == self.compile and not tensors(k[1])),
            None,
        )

    def launch(self, x, key) -> None:
        """Replay graph ``key`` (``ready``) on ``x`` now, for the tower's next call: that call must be on
        ``x``'s values (its signature alone is checked) and takes this replay's outputs."""
        replay, s_args = self.graphs[key][:2]
        load(s_args, (x,))
        replay()
        self.launched = key

    def __call__(self, *args, **kwargs):
        kw = tuple(sorted((k, signature(v)) for k, v in kwargs.items()))
        key = (signature(args), kw, self.compile)  # a compiled call's graph is another graph
        launched, self.launched = self.launched == key, None  # its inputs are these (the caller's word)
        if key not in self.graphs:
            while len(self.graphs) >= KEEP:
                self.graphs.popitem(last=False)
            s_args, s_kw = static(args), {k: static(v) for k, v in kwargs.items()}
            types = []

            def fn():
                t, flat = self._run(s_args, s_kw)
                types[:] = [t]
                return flat

            flat, replay = self.capture(fn)
            self.captures += 1
            self.graphs[key] = (replay, s_args, s_kw, types[0], flat)
        self.graphs.move_to_end(key)
        replay, s_args, s_kw, kind, flat = self.graphs[key]
        if not launched:
            load(s_args, args)
            for k, v in kwargs.items():
                load(s_kw[k], v)
            replay()
        # copies of what is read after the replay returns (the next replay rewrites the graph's memory); a
        # tap's output that is a picked hidden state (the same tensor, as in an eager run) is copied once
        copies: dict = {}
        for t in flat[2:]:
            if t is not None and id(t) not in copies:
                copies[id(t)] = t.clone()
        flat = flat[:2] + [None if t is None else copies[id(t)] for t in flat[2:]]
        n = len(self.taps)
        hidden, grabbed = flat[2 : len(flat) - n], flat[len(flat) - n :]
        for (module, hook), o in zip(self.taps, grabbed):
            hook(module, (), o)
        out = kind(last_hidden_state=flat[0], hidden_states=tuple(hidden))
        if flat[1] is not None:
            out.pooler_output = flat[1]
        return out


def layer_forward(layer, *args, **kwargs):
    """``layer``'s class forward (what ``GraphedTower`` compiles: one function for every layer, the layer an
    input, so layers of one class share its graphs)."""
    return type(layer).forward(layer, *args, **kwargs)


def hooked(m: nn.Module) -> bool:
    """Whether ``m`` has hooks other than transformers' output recorders (on every layer and attention of
    a tower since transformers 5; inactive unless outputs such as attentions are asked for)."""
    hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    return bool(m._backward_hooks or m._backward_pre_hooks) or not all(map(recorder, hooks))


def hook_map(layer) -> dict:
    """{(submodule name, kind): hook functions} inside ``layer``, transformers' recorders left out."""
    out = {}
    for name, m in layer.named_modules():
        if m is layer:
            continue
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = tuple(h for h in getattr(m, kind).values() if not recorder(h))
            if hooks:
                out[(name, kind)] = hooks
    return out


def others(hooks: OrderedDict) -> OrderedDict:
    return OrderedDict((k, h) for k, h in hooks.items() if not recorder(h))


def recorder(hook) -> bool:
    return getattr(hook, "__module__", "") == "transformers.utils.output_capturing"


def recording() -> bool:
    """Whether transformers' output recorders are collecting something now (e.g. attentions): their hooks
    inside a layer must then run, and the layer runs eagerly."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    wanted = _active_collector.get()
    return bool(wanted) and any(not k.startswith("_") for k in wanted)


def encoder_of(tower):
    """The tower's encoder when it runs a ``layers`` list in turn (CLIP, SigLIP), else None."""
    enc = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    return enc if isinstance(getattr(enc, "layers", None), nn.ModuleList) else None


def tensors(kwargs_signature: tuple) -> bool:
    return any(isinstance(v, tuple) and v[:1] == ("t",) for _, v in kwargs_signature)


def tower_of(model, family=None):
    """(tower, feature layers) when the model's family can replay its tower as a graph, else None (Qwen's
    tower builds its attention layout on the host). ``family``: the model's, when the caller has it."""
    from ..patches import family_for

    return (family or family_for(model)).graphable_tower()


def usable(model, family=None) -> bool:
    found = tower_of(model, family)
    w = first_parameter(found[0]) if found is not None else None
    return w is not None and w.is_cuda


class patched:
    """``with patched(model, taps):`` the model's vision tower runs as CUDA graphs (kept on the model);
    ``compile``: its encoder layers through ``torch.compile`` inside the graphs."""

    def __init__(self, model, taps: list, capture=graphs.capture, compile: bool = False, family=None):
        self.model, self.taps, self.capture, self.compile = model, taps, capture, compile
        self.family = family

    def __enter__(self):
        self.tower, layers = tower_of(self.model, self.family)
        tower = self.tower
        store = self.model.__dict__.setdefault(STORE, {})
        w = first_parameter(tower)
        key = (tuple(id(m) for m, _ in self.taps), layers, w.data_ptr(), w.dtype)  # weights swapped: new
        g = store.pop(key, None)  # re-inserted last: the store keeps the most recent few
        if g is None:
            g = GraphedTower(layers, self.taps, self.capture, encoder_of(tower))
            while len(store) >= 2:  # e.g. the model with and without VisionZip's taps, as the demo runs
                store.pop(next(iter(store)))
        store[key] = g
        g.taps = self.taps  # the hooks are new objects per wrap; the modules are the same
        g.compile = self.compile and g.encoder is not None  # (its graphs are keyed by it)
        self.prev = tower.__dict__.get("forward")
        g.forward = tower.forward
        g.launched = None
        tower.forward = g
        self.graph = g
        return g

    def __exit__(self, *exc):
        self.graph.launched = None
        tower = self.tower
        if self.prev is None:
            tower.__dict__.pop("forward", None)
        else:
            tower.forward = self.prev
        return False


@contextlib.contextmanager
def compiled_blocks(model):
    """``with compiled_blocks(model):`` the blocks of a vision tower that is not graphed (Qwen2-VL's, whose
    attention splits the images on the host) run through ``torch.compile`` (graph breaks allowed), each
    block's ``forward`` switched only inside the block; the compiler state is kept on the model (a
    failure warns once). Nothing happens for a model without such a tower. Gives None."""
    blocks = blocks_of(model)
    if blocks is None:
        yield None
        return
    runner = model.__dict__.get(BLOCKS)
    if runner is None:
        runner = model.__dict__[BLOCKS] = CompiledLayers(fullgraph=False, trace_hooks=True)
    with runner.switched(blocks):
        yield None


BLOCKS = "_mmsink_compiled_blocks"


def blocks_of(model):
    """The ``blocks`` list of the model's vision tower when its family names one (``visual``), else None."""
    from ..patches import family_for

    blocks = getattr(getattr(family_for(model), "visual", None), "blocks", None)
    return blocks if isinstance(blocks, nn.ModuleList) else None


def clear(model) -> None:
    model.__dict__.pop(STORE, None)
    model.__dict__.pop(BLOCKS, None)
