"""Fast greedy decoding after a (pruned) prefill: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL.

    out = mmsink.generate_fast(model, max_new_tokens=64, **inputs)   # same tokens as greedy generate()

The prefill runs through the wrapped model as usual (so every pruner's plan applies) up to the layer
where the plan is final (``Pruner.final_layer``): there the layer hook raises ``Handoff`` and the
remaining layers run here, writing straight into the decode buffers, as one CUDA graph per shape on GPU
(a batch-1 prefill is bound by kernel launches, and after the last decision nothing needs the host).
Pruners that decide layer by layer (adaptive VisiPruner) run the model's forward to the end and their
caches are copied in. Each layer's buffer is sized to the tokens that layer kept plus the new tokens, and
one fixed-shape decode step runs per token: the model's own modules (norms, projections, MLP, rotary
table, lm_head) with SDPA over the static buffer and a validity mask. The step also picks the token
(argmax, end-of-sequence bookkeeping) and advances its own counter, so with ``graphs=True`` (default on
CUDA) a whole token is one CUDA-graph replay and no host work. gpt-fast's idea, on a pruned cache: layers
that dropped tokens hold fewer keys.

Decoders are kept on the model (a few, by shape; buffer lengths rounded up so prompts of similar length
share one), so the graph is captured once, not per call. ``compile=True`` (default on CUDA when Triton is
installed) runs one decoder layer's step through ``torch.compile``, shared by all layers, which fuses the
small element-wise kernels that otherwise dominate a batch-1 step; the prefill tail then runs the same way
(``layer_prefill``, n tokens). With graphs on, the vision tower (LLaVA, LLaVA-NeXT) is replayed as a CUDA
graph too (``mmsink.vision_graph``). VAR layers decode through ``var.decode_attention`` (not compiled);
in the prefill tail they make their key codes and VAR's edit as the model's layers do (``var_edit``), or
compiled into ``layer_prefill``'s step.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

from ..core.attention import Directive, base_of
from ..core.graphs import capture as capture_graph
from ..core.graphs import load, signature, static
from ..sinks.var import decode_attention, layer_attention, var_attention

VAR_INPUTS = "mmsink_var"  # run_tail's kwargs entry: VAR's plan tensors (``var.tail_inputs``)
ROUND = 128  # buffer lengths rounded up to this, so similar prompts reuse one captured decoder
KEEP = 4  # decoders kept per model (each holds its KV buffers and graph)
TAILS = 8  # captured prefill tails kept per decoder
STORE = "_mmsink_decoders"  # attribute on the model instance; ``mmsink.unwrap`` removes it
PLACED = "_mmsink_placement"  # (fingerprint, devices, dispatched): see ``placement``


def split_heads(attn, x, heads: int, joint=None, linear=F.linear):
    """Queries, keys and values [B, heads, n, d] of ``x`` (the input norm's output [B, n, D]), not rotated:
    one ``linear`` of ``joint``'s "qkv" where the fused step made it (``fuse.fused``), else the three
    projections."""
    b, n, _ = x.shape
    if joint and "qkv" in joint:
        w, bias = joint["qkv"]
        sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        q, k, v = linear(x, w, bias).split(sizes, -1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    # the head size from the module, not width / heads: compiled with dynamic=True the head counts are
    # symbolic, and a symbolic head size makes every element-wise kernel index with divisions (no wide loads)
    d = getattr(attn, "head_dim", None) or q.shape[-1] // heads
    q = q.reshape(b, n, -1, d).transpose(1, 2)
    return q, k.reshape(b, n, -1, d).transpose(1, 2), v.reshape(b, n, -1, d).transpose(1, 2)


def gated(mlp, x, gu, linear=F.linear):
    """The MLP's ``act(gate) * up`` of ``x`` from the fused gate / up tensors ``gu`` (weight, bias). Split at
    the modules' sizes, not in halves: compiled with dynamic=True the joint weight's rows are symbolic, and
    a symbolic half would make the activation's kernel index through runtime divisions."""
    gate, up = linear(x, *gu).split([mlp.gate_proj.out_features, mlp.up_proj.out_features], -1)
    return mlp.act_fn(gate) * up


def project(layer, h, cos, sin, heads: int, rope, joint=None):
    """The layer's queries, keys and values [B, heads, n, d] for hidden states ``h`` [B, n, D], rotated.
    ``joint``: the layer's fused tensors (their "qkv": one GEMM for the three)."""
    q, k, v = split_heads(layer.self_attn, layer.input_layernorm(h), heads, joint)
    q, k = rope(q, k, cos, sin)
    return q, k, v


def finish(layer, h, o, joint=None):
    """The rest of the layer after attention: output projection, residual, MLP (``joint``'s "gu": one
    GEMM for gate and up)."""
    h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(*h.shape[:2], -1))
    x = layer.post_attention_layernorm(h)
    if joint and "gu" in joint:
        return h + layer.mlp.down_proj(gated(layer.mlp, x, joint["gu"]))
    return h + layer.mlp(x)


def grouped(heads, kv_heads) -> dict:
    """SDPA's ``enable_gqa`` for these head counts. A branch, not the comparison passed on: compiled with
    ``dynamic=True`` the counts are symbolic, SDPA refuses a symbolic bool and dynamo breaks the graph at
    the attention (the layer then runs as two graphs with the attention eager between them)."""
    return {"enable_gqa": True} if heads != kv_heads else {}


def write_slot(kb, vb, ok, k, v, slot) -> None:
    """The new token's key and value into the buffers [B, kv_heads, S, d] at ``slot`` (a [1] long tensor),
    and the slot marked valid in ``ok`` [B, S]."""
    kb.index_copy_(2, slot, k)
    vb.index_copy_(2, slot, v)
    ok.index_fill_(1, slot, True)


def layer_step(layer, h, cos, sin, kb, vb, ok, slot, heads: int, kv_heads: int, rope, var=None):
    """One decoder layer for one new token: write its key / value at ``slot``, attend over the buffer.
    ``var``: (key codes [B, slots], VARConfig, the wrap's CompiledVAR) in a layer where VAR redistributes
    attention."""
    scale = layer.self_attn.scaling
    q, k, v = project(layer, h, cos, sin, heads, rope)
    write_slot(kb, vb, ok, k, v, slot)
    if var is not None:
        o = decode_attention(q, kb, vb, ok, var[0], scale, var[1], var[2])
    else:
        o = F.scaled_dot_product_attention(
            q, kb, vb, attn_mask=ok[:, None, None, :], scale=scale, **grouped(heads, kv_heads)
        )
    return finish(layer, h, o)


def layer_prefill(layer, h, cos, sin, kb, vb, mask, heads: int, kv_heads: int, rope, var=None, joint=None):
    """One decoder layer over a prefill's ``n`` tokens (the tail after the hand-off): keys / values into
    the buffer's first ``n`` slots, causal attention (``mask`` [B,1,n,n] bool, or None: no padding). The
    same modules and arithmetic as the model's layer; compiled, its small element-wise kernels fuse.
    ``var``: (the layer's codes rows [B, slots], visual, prompt and valid slots [B, n], edited rows
    [B, R], VARConfig) in a layer VAR edits: its key codes (into the codes rows) and its edit, compiled
    with the rest of the layer (``var.layer_attention``)."""
    scale, n = layer.self_attn.scaling, h.shape[1]
    q, k, v = project(layer, h, cos, sin, heads, rope, joint)
    kb[:, :, :n].copy_(k)
    vb[:, :, :n].copy_(v)
    if var is not None:
        codes, vis, prompt, valid, ri, cfg = var
        o, c = layer_attention(q, k, v, mask, valid, scale, ri, cfg, (h, vis, prompt))  # [B, n, H, d]
        codes[:, :n].copy_(c)
        h = h + layer.self_attn.o_proj(o.reshape(*h.shape[:2], -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))
    gqa = grouped(heads, kv_heads)
    if mask is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
    return finish(layer, h, o, joint)


def var_layer_prefill(layer, h, cos, sin, kb, vb, mask, heads: int, kv_heads: int, rope, var):
    """``layer_prefill`` of a layer VAR edits, compiled apart: its own code object, so torch.compile's
    cache entries (at most 8 per code object) for VAR's layers and for the plain ones do not add up."""
    return layer_prefill(layer, h, cos, sin, kb, vb, mask, heads, kv_heads, rope, var)


def moved(carry, dev):
    return None if carry is None else tuple(x.to(dev) for x in carry)


class StaticKV:
    """The cache the tail layers see: their keys and values go straight into the decoder's buffers."""

    def __init__(self, dec, n: int, rows: slice = slice(None)):
        self.dec, self.n, self.rows = dec, n, rows  # rows: a chunk's rows of the buffers (prefill_batch)

    def update(self, key, value, layer_idx, cache_kwargs=None):
        self.dec.k[layer_idx][self.rows, :, : self.n].copy_(key)
        self.dec.v[layer_idx][self.rows, :, : self.n].copy_(value)
        return key, value


class FastDecoder:
    """Static per-layer KV buffers, the token state, and the one-token decode step."""

    def __init__(
        self, family, caps: list[int], batch: int, max_new: int, eos: tuple, compile: bool = False, var=None
    ):
        model = family.model
        lm = family.language_model
        self.rope = family.lm_parts.rope
        self.layers, self.embed, self.norm, self.rotary = (
            family.layers,
            lm.embed_tokens,
            lm.norm,
            lm.rotary_emb,
        )
        self.head = model.lm_head
        cfg = family.text_config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            raise ValueError("mmsink: generate_fast does not implement sliding-window attention")
        self.mrope = family.mrope
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        d = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // self.heads
        dtype = self.head.weight.dtype
        self.k, self.v, self.valid, self.start = [], [], [], []
        for layer, cap in zip(self.layers, caps):
            dev = layer.self_attn.q_proj.weight.device
            self.k.append(torch.zeros(batch, self.kv_heads, cap, d, dtype=dtype, device=dev))
            self.v.append(torch.zeros(batch, self.kv_heads, cap, d, dtype=dtype, device=dev))
            self.valid.append(torch.zeros(batch, cap, dtype=torch.bool, device=dev))
            self.start.append(torch.zeros((), dtype=torch.long, device=dev))
        dev = self.embed.weight.device
        self.caps, self.max_new = list(caps), max_new
        self.pos0 = torch.zeros(batch, dtype=torch.long, device=dev)
        self.delta = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)  # the token fed to the next step
        self.t = torch.zeros((), dtype=torch.long, device=dev)  # how many steps ran
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.out = torch.zeros(batch, max_new, dtype=torch.long, device=dev)
        self.eos = torch.tensor(eos, dtype=torch.long, device=dev).reshape(-1)  # part of the decoder's key
        self.pad = torch.zeros((), dtype=torch.long, device=dev)
        self.layer_fn = torch.compile(layer_step, dynamic=True) if compile else layer_step
        self.prefill_fn = torch.compile(layer_prefill, dynamic=True) if compile else None
        self.var_prefill_fn = torch.compile(var_layer_prefill, dynamic=True) if compile else None
        self.sdpa = base_of(family.text_config._attn_implementation) == "sdpa"
        self.graph = None  # the decode step's replay, once captured
        self.joint = [{} for _ in self.layers]  # fused weights per layer (fuse.StepDecoder's)
        self.staged: list = []  # or, split over devices: (device, inputs, replay, outputs) per stage
        self.tails: collections.OrderedDict = (
            collections.OrderedDict()
        )  # prefill tails by (first layer, shapes)
        self.seen: dict = {}  # how often each tail shape came
        # VAR: (config, layers); each such layer keeps its keys' group codes (new tokens: "other")
        self.var_cfg, var_layers = var if var is not None else (None, ())
        self.codes = {i: torch.zeros_like(self.valid[i], dtype=torch.long) for i in var_layers}
        self.var_compiled = None  # the running wrap's CompiledVAR, set by generate_fast each run

    def fill(self, cache, attention_mask, tok, delta, pad, tail=None) -> None:
        """Load one prefill: its per-layer keys / values and masks, positions, first token, stop ids.
        ``tail``: (first layer, valid [B, n]) when layers from there on wrote their keys and values
        here themselves (``run_tail``)."""
        self.open(self.load(cache, attention_mask, tail))
        self.start_state(attention_mask, tok, delta, pad)

    def load(self, cache, attention_mask, tail=None, rows: slice | None = None, skip: int = 0) -> list[int]:
        """``fill``'s per-layer part: a prefill's keys / values, valid slots and VAR codes into the buffers'
        rows ``rows`` (None: all; a chunk's rows with ``generate_fast(prefill_batch=)``), less the cache's
        first ``skip`` slots (padding in every row). Returns the slots each layer holds (the decode's first
        slot there, ``open``)."""
        from ..core.cache import PlanCache

        r = slice(None) if rows is None else rows
        planned = isinstance(cache, PlanCache) and cache.planned
        b = attention_mask.shape[0]
        first = tail[0] if tail is not None else len(self.layers)
        lengths = [0] * len(self.layers)
        if tail is not None:
            valid = tail[1]
            for i in range(first, len(self.layers)):
                self.mark_valid(i, r, valid)
                lengths[i] = valid.shape[1]
        for i, layer in enumerate(cache.layers[:first]):
            k, v = layer.keys, layer.values  # [B, kv_heads, n, head_dim]
            n = k.shape[2]
            if tail is not None:
                valid = tail[2][i]
            else:
                valid = cache.segment_valid[cache.layer_segment[i]] if planned else attention_mask.bool()
            if valid.shape != (b, n):
                raise ValueError(f"mmsink: cache layer {i} holds {n} slots, its mask {tuple(valid.shape)}")
            k, v, valid, n = k[:, :, skip:], v[:, :, skip:], valid[:, skip:], n - skip
            self.k[i][r, :, :n] = k
            self.v[i][r, :, :n] = v
            self.mark_valid(i, r, valid)
            lengths[i] = n
        codes = getattr(cache, "layer_codes", {})  # none where the wrap left a chunk untouched (no image)
        for i, c in self.codes.items():
            if i >= first:  # the tail wrote this layer's codes: the slots after them are new tokens'
                c[r, tail[1].shape[1] :] = 0
                continue
            c[r] = 0
            if i in codes:
                c[r, : codes[i].shape[1]] = codes[i].to(c.device)
        return lengths

    def mark_valid(self, i: int, rows: slice, valid) -> None:
        """Layer ``i``'s valid slots of ``rows``: ``valid`` [rows, n] first, the rest invalid."""
        ok = self.valid[i][rows]
        ok.zero_()
        ok[:, : valid.shape[1]] = valid.to(ok.device)

    def open(self, lengths: list[int]) -> None:
        """Decoding writes layer i's new tokens from slot ``lengths[i]`` on (one start for every row: a
        chunk that kept fewer slots leaves the rest of its rows' slots invalid)."""
        for start, n in zip(self.start, lengths):
            start.fill_(n)

    def rewind(self, lengths: list[int]) -> None:
        """Undo a decode step's writes after loading (a capture's warm-up step): slots from ``lengths``
        on invalid again, then ``open``. For a decoder loaded chunk by chunk, whose chunks' caches are
        gone by then and cannot be loaded again (``fill``'s way)."""
        for ok, n in zip(self.valid, lengths):
            ok[:, n:] = False
        self.open(lengths)

    def start_state(self, attention_mask, tok, delta, pad) -> None:
        """The per-run state every decoder starts from: positions, first token, step, pad id, done rows."""
        self.pos0.copy_(attention_mask.long().sum(1))  # the first new token's position (HF: mask cumsum)
        if delta is not None:
            self.delta.copy_(delta)
        self.tok.copy_(tok)
        self.t.zero_()
        self.pad.fill_(pad)
        self.done.copy_((tok[:, None] == self.eos[None]).any(1))

    def step(self) -> None:
        """Feed ``tok`` (the ``t``-th new token), pick the next one, record it, advance ``t``."""
        carry = self.layers_op(0, len(self.layers), *self.start_op())
        self.book_op(*self.pick_op(*carry))

    def start_op(self):
        h = self.embed(self.tok[:, None])
        pos = (self.pos0 + self.t)[:, None]
        if self.mrope:  # the same position on the t, h and w axes, shifted by the image's rope delta
            pos = (pos + self.delta).expand(3, -1, -1)
        cos, sin = self.rotary(h, pos)
        return h, cos, sin, self.t

    def layers_op(self, lo: int, hi: int, h, cos, sin, t):
        for i in range(lo, hi):
            kb = self.k[i]
            dev = kb.device  # layers may sit on different GPUs (device_map)
            var = (self.codes[i], self.var_cfg, self.var_compiled) if i in self.codes else None
            h = (self.layer_fn if var is None else layer_step)(  # VAR layers: not compiled
                self.layers[i],
                h.to(dev),
                cos.to(dev),
                sin.to(dev),
                kb,
                self.v[i],
                self.valid[i],
                (self.start[i] + t.to(dev)).view(1),
                self.heads,
                self.kv_heads,
                self.rope,
                var,
            )
        return h, cos, sin, t

    def pick_op(self, h, *_):
        h = h.to(self.norm.weight.device)
        return (self.head(self.norm(h))[:, -1].argmax(-1),)

    def book_op(self, nxt):
        nxt = torch.where(self.done, self.pad, nxt.to(self.tok.device))
        self.out.index_copy_(1, self.t.view(1), nxt[:, None])
        self.done |= (nxt[:, None] == self.eos[None]).any(1)
        self.tok.copy_(nxt)
        self.t += 1

    def stages(self) -> list:
        """The step as [(device, ops)]: the ops of one device in a row form a stage. One stage when every
        weight sits on one device; a model split over GPUs gets one per run of layers, plus the head's and
        the bookkeeping's where those sit elsewhere."""
        ops = [(self.embed.weight.device, ("start",))]
        ops += [(kb.device, ("layers", i, i + 1)) for i, kb in enumerate(self.k)]
        ops += [(self.head.weight.device, ("pick",)), (self.tok.device, ("book",))]
        out = []
        for dev, op in ops:
            if not out or out[-1][0] != dev:
                out.append((dev, []))
            last = out[-1][1]
            if op[0] == "layers" and last and last[-1][0] == "layers":
                last[-1] = ("layers", last[-1][1], op[2])
            else:
                last.append(op)
        return out

    def run_ops(self, ops, carry):
        for op in ops:
            if op[0] == "start":
                carry = self.start_op()
            elif op[0] == "layers":
                carry = self.layers_op(op[1], op[2], *carry)
            elif op[0] == "pick":
                carry = self.pick_op(*carry)
            else:
                self.book_op(*carry)
                carry = ()
        return carry

    def capture_stages(self, stages=None, graphs: bool = True) -> None:
        """One CUDA graph per stage, on its own device (a graph is captured on one device); between
        stages the carried tensors (hidden state, rotary table, counter, token) are copied into the next
        stage's static inputs. ``graphs=False``: the stages as plain calls (the same hand-over)."""
        self.staged = []
        carry = None
        for dev, ops in stages or self.stages():
            if not graphs:
                self.staged.append(
                    (dev, None, lambda c, ops=ops, dev=dev: self.run_ops(ops, moved(c, dev)), None)
                )
                continue
            inp = None if carry is None else tuple(x.detach().to(dev, copy=True) for x in carry)
            with torch.cuda.device(dev):
                carry, replay = capture_graph(lambda ops=ops, inp=inp: self.run_ops(ops, inp))
            self.staged.append((dev, inp, replay, carry))

    def step_stages(self) -> None:
        prev = None
        for dev, inp, replay, out in self.staged:
            if out is None:  # plain calls
                prev = replay(prev)
                continue
            if inp is not None:
                load(inp, prev)
            with torch.cuda.device(dev):
                replay()
            prev = out

    def tail(self, first: int, hidden, kwargs, rows: slice | None = None) -> torch.Tensor:
        """Layers ``first``.. of a prefill whose plan is final, keys and values into the buffers (their
        rows ``rows``: a chunk's, ``prefill_batch``); returns the next token [B]. With ``compile`` and
        SDPA each layer is one ``layer_prefill`` step (the layer's own modules); otherwise the model's own
        layer forwards run (mmsink's hooks are not needed past the plan's last decision). VAR's layers get
        its edit from the plan tensors in ``kwargs[VAR_INPUTS]`` (``layer_prefill``'s, or ``var_edit``)."""
        r = slice(None) if rows is None else rows
        kwargs = dict(kwargs)
        var, memo = kwargs.pop(VAR_INPUTS, None), {}
        mask, pe = kwargs.get("attention_mask"), kwargs.get("position_embeddings")
        compiled = (
            self.prefill_fn is not None
            and self.sdpa
            and pe is not None
            and (
                mask is None
                or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4)
            )
            # VARConfig(compile=False): its layers' work stays eager here too (the model's own forwards)
            and not (var is not None and self.var_cfg is not None and self.var_cfg.compile is False)
        )
        h = hidden
        if compiled:  # our fused step (the model's modules); else the model's own layer forwards
            for i in range(first, len(self.layers)):
                edits = var is not None and i in self.codes
                at = (self.codes[i][r], *var, self.var_cfg) if edits else None
                args = (self.layers[i], h, *pe, self.k[i][r], self.v[i][r], mask, self.heads, self.kv_heads)
                if at is None:  # the fused step's joint q / k / v and gate / up GEMMs where it made them
                    h = self.prefill_fn(*args, self.rope, None, self.joint[i])
                else:
                    h = self.var_prefill_fn(*args, self.rope, at)
        else:
            kw = {**kwargs, "past_key_values": StaticKV(self, hidden.shape[1], r), "use_cache": True}
            for i in range(first, len(self.layers)):
                edit = self.var_edit(i, h, var, r, memo)
                more = {} if edit is None else {"mmsink": Directive(i, reweight=edit)}
                h = self.layers[i].forward(h, **kw, **more)
                h = h[0] if isinstance(h, tuple) else h
        logits = self.head(self.norm(h[:, -1:]))[:, -1]  # slots in order: the last is the prompt's end
        return logits.argmax(-1)

    def var_edit(self, i: int, h, var, rows: slice, memo: dict):
        """Tail layer ``i``'s attention with VAR's edit (a directive's reweight), or None where VAR does
        not edit it: key codes from ``h`` (the state entering the layer) and the plan's tensors ``var``
        (``var.tail_inputs``), made and applied in one call as the model's layers do (``prefill_edit``),
        the codes written into the layer's ``codes`` rows for decoding. ``memo``: the masks and row
        indices, made once per tail (its layers share them)."""
        if var is None or i not in self.codes:
            return None
        vis, prompt, valid, ri = var
        cfg, fns, codes, source = self.var_cfg, self.var_compiled, self.codes[i], (h, vis, prompt)

        def reweight(q, k, v, mask, scale, base):
            out, c, _ = var_attention(q, k, v, mask, valid, scale, base, None, ri, cfg, memo, fns, source)
            codes[rows, : c.shape[1]].copy_(c)
            return out

        return reweight

    def run_tail(
        self, first: int, hidden, kwargs, graphs: bool, rows: slice | None = None, var=None
    ) -> torch.Tensor:
        """``tail``, as one CUDA graph per (first layer, shapes) when ``graphs``: a batch-1 prefill is
        bound by launching kernels, and after the plan's last decision nothing needs the host. A shape is
        captured the second time it comes (capturing costs two tails and the graph's memory, which a
        one-off prompt length would never repay); the last ``TAILS`` graphs are kept. A chunk's ``rows``
        run eagerly: a graph would be specific to the rows it writes, and a chunk of a large batch is
        bound by arithmetic, not launches. ``var``: VAR's plan tensors (``var.tail_inputs``) when VAR edits
        layers of the tail (their codes go to ``codes``; static inputs of the graph like the rest)."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "mmsink")}
        if var is not None:
            kwargs[VAR_INPUTS] = tuple(var)
        if rows is not None:
            return self.tail(first, hidden, kwargs, rows)
        if not graphs:
            return self.tail(first, hidden, kwargs)
        key = (first, signature(hidden), tuple(sorted((k, signature(v)) for k, v in kwargs.items())))
        if key not in self.tails:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < 2:
                if len(self.seen) > 4096:  # counts of one-off shapes: bounded
                    self.seen.clear()
                return self.tail(first, hidden, kwargs)
            h_in, kw_in = hidden.clone(), {k: static(v) for k, v in kwargs.items()}
            out, replay = capture_graph(lambda: self.tail(first, h_in, kw_in))
            self.tails[key] = (replay, h_in, kw_in, out)
            while len(self.tails) > TAILS:
                self.tails.popitem(last=False)
        self.tails.move_to_end(key)
        replay, h_in, kw_in, out = self.tails[key]
        h_in.copy_(hidden)
        for k, v in kwargs.items():
            load(kw_in[k], v)
        replay()
        return out.clone()

    def capture(self) -> None:
        """Record ``step`` as one CUDA graph (one per device for a model split over GPUs). The warm-up
        step's writes are undone by the caller's ``fill`` (it resets the counter, the masks, the token)."""
        if len(self.stages()) > 1:
            self.capture_stages()
        else:
            self.graph = capture_graph(self.step)[1]

    def captured(self) -> bool:
        """Whether the step is recorded (one graph, or one per stage)."""
        return self.graph is not None or bool(self.staged)

    def run(self, steps: int) -> int:
        """Up to ``steps`` tokens; stops early (checked every 8 tokens) when every sample has ended."""
        for t in range(steps):
            if self.graph is not None:
                self.graph()
            elif self.staged:
                self.step_stages()
            else:
                self.step()
            if (t + 1) % 8 == 0 and bool(self.done.all()):
                return t + 1
        return steps


def first_parameter(module):
    """``next(module.parameters(), None)`` through the modules' own dicts (the same order; a generator
    over ``named_modules`` per block costs host time on every call)."""
    for p in module._parameters.values():
        if p is not None:
            return p
    for child in module._modules.values():
        p = None if child is None else first_parameter(child)
        if p is not None:
            return p
    return None


def placement(model) -> tuple[set, bool]:
    """(devices of the weights, whether accelerate dispatched the model: its hooks move tensors). A walk
    over every parameter and module costs milliseconds of host time per call on a 7B model, so the answer
    is kept on the model against a fingerprint (device and storage of the first weight of every top-level
    block and decoder layer), and walked again when that changes."""
    try:
        blocks = [*model.model._modules.values(), *model.model.language_model.layers, model.lm_head]
    except AttributeError:
        blocks = [model]
    firsts = [first_parameter(b) for b in blocks if b is not None]
    key = tuple((p.device, p.data_ptr()) for p in firsts if p is not None)
    kept = model.__dict__.get(PLACED)
    if kept is None or kept[0] != key:
        devices = {p.device for p in model.parameters()}
        dispatched = any(hasattr(m, "_hf_hook") for m in model.modules())  # accelerate moves tensors itself
        kept = model.__dict__[PLACED] = (key, devices, dispatched)
    return kept[1], kept[2]


def decode_kv(family, p, ids, max_new_tokens: int, graphs: bool, stop, need, make):
    """(new tokens [B, n], decoder or None) of a kv mode's greedy decoding after the prefill ``p``
    (``generate_fast``'s for kv modes: the whole prompt through the model, no hand-off). The part the
    modes share: ``need`` (cache class, what is missing in words) checks the prefill's cache; ``stop``:
    (end-of-sequence ids, pad id); nothing is decoded for one token or when every sample ended at its
    first; ``make(steps)`` gives the mode's decoder (kept on the model); on the first graphed call it is
    filled and captured, then filled again (undoing the warm-up step), and run."""
    kind, missing = need
    if not isinstance(p.cache, kind):
        raise ValueError(f"mmsink: generate_fast's {missing} from the prefill")
    stops, pad = stop
    eos = torch.tensor(stops, dtype=torch.long, device=ids.device)
    new = p.tok[:, None]
    if max_new_tokens == 1 or bool(torch.isin(p.tok, eos).all()):
        return new, None
    steps = max_new_tokens - 1
    dec = make(steps)
    delta = p.rope_deltas(family) if dec.mrope else None
    if graphs and not dec.captured():
        dec.fill(p.cache, p.mask, p.tok, delta, pad)
        dec.capture()
    dec.fill(p.cache, p.mask, p.tok, delta, pad)
    p.cache = None  # the decoder holds its own copy: the prefill's cache need not live through decoding
    n = dec.run(steps)
    return torch.cat([new, dec.out[:, :n].to(ids.device)], 1), dec
