"""The handle ``wrap`` attaches to one model instance: its settings, its hooks, the last Stats.

Everything is per instance: hooks on this model's modules, its own text config's attention entry, a
``generate`` bound on the instance. ``detach`` removes exactly these. A forward goes: ``model_pre``
(a prefill builds its Layout and Prefill; a cached step its Decode), then per decoder layer
``layer_pre`` (the plan's segment, mask, rotary rows and attention directive) and ``layer_post`` (the
pruner's decision), then ``lm_post`` / ``model_post`` (outputs back to full length, the plan into the
cache, stats deferred).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from transformers.cache_utils import DynamicCache

from ..pruners import REGISTRY
from ..pruners.base import check_size
from ..sinks import var as var_steps
from ..sinks import vitsink
from . import attention, varlen
from .attention import Directive
from .bind import Bound
from .cache import PlanCache
from .family import Seam
from .flops import DecoderCost
from .plan import Decode, Prefill, layer_device
from .stats import Meter, plain_stats, prefill_stats

ATTR = "_mmsink"


class Handoff(Exception):
    """Raised by the layer hook where a prefill's plan is final, when ``generate_fast`` asked for it:
    it carries the hidden states and the layer's call arguments so that the remaining layers can run
    as one captured graph. Never escapes ``generate_fast``."""

    def __init__(self, ctx, layer: int, hidden, kwargs):
        super().__init__("mmsink: prefill handoff")
        self.ctx, self.layer, self.hidden, self.kwargs = ctx, layer, hidden, kwargs


def get_handle(model) -> Handle:
    h = getattr(model, "__dict__", {}).get(ATTR)
    if h is None:
        raise ValueError("mmsink: this model is not wrapped (call mmsink.wrap first)")
    return h


class Handle:
    def __init__(self, model, family, pruner, var=None, sinks=None, use_varlen: bool | None = None, kv=None):
        self.model, self.family, self.pruner, self.var, self.sinks = model, family, pruner, var, sinks
        self.kv = kv  # mmsink.kv's config: it checks the model and installs its own hooks (after ours)
        # VAR's torch.compile wrappers and their fallback flags: this wrap's own, gone with the handle
        self.var_compiled = var_steps.CompiledVAR() if var is not None else None
        self.sink_threshold = None
        if sinks is not None:
            self.sink_threshold = sinks.threshold or vitsink.known_threshold(family.config.vision_config)
        # VAR without a pruner still needs the plan machinery: a pruner that keeps everything
        self.planner = pruner if pruner is not None else REGISTRY["none"]()
        self.enabled = True
        self.ctx = None  # the running forward's Prefill or Decode
        self.measuring = False  # a prefill is running: families count vision work
        self.last_layout = None
        self.layout_ids = None  # the input ids the last layout was built from
        self.prompt_len: int | None = None
        self.handoff = False  # set by generate_fast: stop the prefill where the plan is final
        self.local_positions = False  # set by generate_fast: its positions start at 0 on each sample
        self.last_stats = None  # Stats, or a function building them (see ``deferred``)
        self.hooks: list = []
        self.own_attention = True  # attach() set the text model's attention entry to ours
        self.vision_taps: list = []  # (module, hook) pairs inside the vision tower (graphed towers call them)
        self.base = family.text_config._attn_implementation or "eager"
        if self.base not in attention.BASES:
            raise ValueError(
                f"mmsink: attention implementation {self.base!r} is not supported; "
                f"use one of {attention.BASES}"
            )
        # padded prefill segments on a ragged FlashAttention kernel (SDPA base; used where tensors allow)
        self.varlen = use_varlen is not False and self.base == "sdpa" and varlen.kernel() is not None
        self.num_layers = len(family.layers)
        self.meter = Meter(
            pruner.name if pruner else None,
            pruner.budget if pruner else None,
            DecoderCost.of(family.layers, family.text_config),
            self.num_layers,
            self.planner.plans_text,
        )
        if var is not None:
            var.check_model(self.num_layers, family.text_config.hidden_size)
        if pruner is not None:
            pruner.check_model(self.num_layers)
            if family.tokens_per_image:
                check_size(pruner.budget, [family.tokens_per_image])
        if kv is not None:
            kv.check(self)

    # ------------------------------------------------------------------ attach / detach
    def attach(self, own_attention: bool = True):
        """Install the hooks; ``own_attention=False`` leaves the model's attention entry as it is (a handle
        whose layers never run with a directive: generate_fast's for an unwrapped model)."""
        self.own_attention = own_attention
        if own_attention:
            attention.register()
            self.set_attention(attention.registered_name(self.base))
        m, fam = self.model, self.family
        self.hooks.append(m.register_forward_pre_hook(self.model_pre, with_kwargs=True))
        self.hooks.append(m.register_forward_hook(self.model_post, with_kwargs=True))
        self.hooks.append(fam.language_model.register_forward_hook(self.lm_post))
        self.hooks += fam.install(Seam(self))
        self.hooks += self.planner.install(Seam(self), fam)
        vision = getattr(self.planner, "uses_vision", False)
        if self.sinks is not None or vision:
            self.hooks.append(fam.projector.register_forward_pre_hook(self.projector_pre))
        if vision:
            self.hooks += self.tap_vision()
        for i, layer in enumerate(fam.layers):
            self.hooks.append(layer.register_forward_pre_hook(self.layer_pre(i), with_kwargs=True))
            self.hooks.append(layer.register_forward_hook(self.layer_post(i)))
        if self.kv is not None:
            self.hooks += self.kv.install(self)
        self.hooks.append(Bound(m, "generate", self.bound_generate))
        m.__dict__[ATTR] = self

    def detach(self):
        for h in reversed(self.hooks):
            h.remove()
        self.hooks.clear()
        if self.own_attention:
            self.set_attention(self.base)
        self.model.__dict__.pop(ATTR, None)
        self.ctx = None

    def set_attention(self, name: str) -> None:
        """The text model's attention entry (the vision tower keeps its own), through transformers' API."""
        self.model.set_attn_implementation({"text_config": name})

    def bound_generate(self, previous):
        handle = self

        def generate(model_self, *args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            with handle.session(prompt_len=ids.shape[1] if isinstance(ids, torch.Tensor) else None):
                return previous(*args, **kwargs)

        return generate

    @contextlib.contextmanager
    def session(self, prompt_len=None, handoff=False, local=False):
        """Within the block, selection is anchored to the prompt's last token (``prompt_len``: where the
        prompt ends, as ``generate`` knows it) and, with ``handoff``, a prefill stops where its plan is
        final (``generate_fast`` runs the rest). ``local``: the caller's positions start at 0 on every
        sample's first real token (``generate_fast``'s own)."""
        prev = self.prompt_len, self.handoff, self.local_positions
        self.prompt_len, self.handoff, self.local_positions = prompt_len, handoff, local
        try:
            yield self
        finally:
            self.prompt_len, self.handoff, self.local_positions = prev

    def tap_vision(self) -> list:
        """Record the tower outputs (or inputs) a vision-stage pruner's scores come from, per prefill."""

        def recorder(name, kind):
            def hook(module, args, *rest):
                ctx = self.ctx
                if isinstance(ctx, Prefill):
                    ctx.taps[name] = rest[0] if kind == "kwargs" else rest[-1]

            return hook

        out, self.vision_taps = [], []
        for name, module, kind in self.family.vision_taps():
            hook = recorder(name, kind)
            if kind == "kwargs":
                out.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                self.vision_taps.append((module, hook))
                out.append(module.register_forward_hook(hook))
        return out

    # ------------------------------------------------------------------ model-level hooks
    def model_pre(self, module, args, kwargs):
        self.ctx = None
        if not self.enabled:
            return None
        if kwargs.get("pixel_values") is not None:  # a prefill with images (decode steps: untouched)
            self.family.host_inputs(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        pkv = kwargs.get("past_key_values")
        if isinstance(pkv, PlanCache) and pkv.planned and pkv.get_seq_length() > 0:
            self.ctx = Decode.start(pkv, self.base, ids, kwargs)
            return None
        if pkv is not None and pkv.get_seq_length() > 0:
            return None  # a cache this wrapper did not plan (e.g. filled under disabled())
        if ids is None:
            if self.planner.name != "none" or self.var is not None:
                raise ValueError("mmsink: pass input_ids (not inputs_embeds) so image tokens can be located")
            return None
        return self.start_prefill(ids, pkv, args, kwargs)

    def start_prefill(self, ids, pkv, args, kwargs):
        self.measuring = True
        self.family.reset_measure()
        grids = getattr(self.planner, "uses_grids", False)
        layout = self.family.layout(ids, kwargs.get("attention_mask"), self.prompt_len, kwargs, grids)
        self.last_layout, self.layout_ids = layout, ids
        if layout.dense and kwargs.get("pixel_values") is not None:
            # no padding: no mask (transformers would read an all-ones mask on the device to skip it)
            kwargs["attention_mask"] = None
        if (not any(layout.sizes) and not self.planner.plans_text) or (
            self.pruner is None and self.var is None and self.sinks is None
        ):
            return None  # no image (or nothing to do): the model runs untouched
        ctx = Prefill(
            layout, self.num_layers, self.base, self.planner.budget_per, self.family.lm_parts, kwargs
        )
        self.planner.start(ctx)
        ctx.handoff = self.handoff  # (VAR's edits after the hand-off: generate_fast's tail makes them)
        ctx.local_positions = self.local_positions
        if ctx.handoff:
            ctx.final_layer = self.planner.final_layer(ctx)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.family.text_config, "use_cache", True)
        if use_cache:
            if pkv is not None and type(pkv) not in (DynamicCache, PlanCache):
                raise ValueError(
                    f"mmsink: {type(pkv).__name__} is not supported with pruning; "
                    "use the default dynamic cache"
                )
            ctx.cache = pkv if isinstance(pkv, PlanCache) else PlanCache(config=self.family.text_config)
            kwargs["past_key_values"] = ctx.cache
        self.ctx = ctx
        return args, kwargs

    def model_post(self, module, args, kwargs, output):
        ctx, self.ctx = self.ctx, None
        if self.measuring and ctx is None:  # an untouched prefill; vision work is known only now
            self.last_stats = self.deferred(self.last_layout, kwargs)
        self.measuring = False
        if isinstance(ctx, Decode):
            ctx.cache.commit(ctx.n_q)
        if isinstance(ctx, Prefill):
            self.end_prefill(ctx, kwargs)
        return None

    def end_prefill(self, ctx: Prefill, kwargs) -> None:
        ctx.to(ctx.home)  # back where the call started when layers were on several devices
        if ctx.cache is not None:
            ctx.cache.set_plan(
                ctx.layer_segment,
                [s.valid for s in ctx.segments],
                [s.full for s in ctx.segments],
                ctx.layout.length,
                ctx.var_codes,
            )
        self.last_stats = self.deferred(ctx, kwargs)

    def finish_handoff(self, h: Handoff, kwargs, codes: dict | None = None) -> None:
        """The bookkeeping of a prefill whose layers from ``h.layer`` on ran outside the model (in
        ``generate_fast``): they all ran on the final segment. ``codes``: VAR's key codes [B, n] of those
        layers where it edited them (their stats as the model's layers would have left them); the cache
        gets the codes of the layers before, which the decoder loads from it."""
        ctx = h.ctx
        for _ in range(h.layer + 1, self.num_layers):
            ctx.layer_segment.append(len(ctx.segments) - 1)
            ctx.slots.append(ctx.seg.n)
        if ctx.cache is not None and ctx.var_codes:
            ctx.cache.layer_codes = dict(ctx.var_codes)
        if codes:
            cost = self.meter.cost
            (b, n), r = ctx.seg.valid.shape, var_steps.edited_rows_of(ctx).shape[1]
            for layer, c in codes.items():
                ctx.var_codes[layer] = c
                ctx.attn_flops[layer] = var_steps.edit_flops(b, cost.heads, n, n, cost.head_dim, r)
        self.ctx, self.measuring = None, False
        ctx.to(ctx.home)
        self.last_stats = self.deferred(ctx, kwargs)

    def lm_post(self, module, args, output):
        ctx = self.ctx
        if not isinstance(ctx, Prefill) or ctx.seg.full:
            return None
        out, seg, length = output.last_hidden_state, ctx.seg, ctx.layout.length
        # back to full length by a scatter of fixed shape (no boolean indexing: no device sync); padding
        # slots write to one extra column that is cut off
        full = out.new_zeros(ctx.layout.batch, length + 1, out.shape[-1])
        idx = torch.where(seg.valid, seg.idx, length).to(out.device)
        full.scatter_(1, idx[..., None].expand(-1, -1, out.shape[-1]), out)
        output.last_hidden_state = full[:, :length]
        return output

    def projector_pre(self, module, args):
        ctx = self.ctx
        if not isinstance(ctx, Prefill):
            return None
        features = args[0]
        if self.sinks is not None:  # detected here, so a vision-stage pruner knows what will be protected
            ctx.vit = self.family.vit_norms(features, ctx.kwargs)
            ctx.vit_sink_mask = [vitsink.detect(n, self.sinks, self.sink_threshold) for n in ctx.vit]
        if getattr(self.planner, "uses_vision", False):
            tokens = self.family.vision_tokens(features, ctx.kwargs, ctx.taps)
            ctx.taps = {}
            ctx.extra_flops += tokens.flops
            return (self.planner.vision(ctx, tokens), *args[1:])
        return None

    # ------------------------------------------------------------------ layer hooks
    def layer_pre(self, layer: int):
        weight = next(self.family.layers[layer].parameters(), None)

        def hook(module, args, kwargs):
            ctx = self.ctx
            if ctx is None:
                return None
            dev = layer_device(module, weight)
            if isinstance(ctx, Decode):
                return self.decode_layer(ctx, layer, dev, args, kwargs)
            return self.prefill_layer(ctx, layer, dev, args, kwargs)

        return hook

    def decode_layer(self, ctx: Decode, layer: int, dev, args, kwargs):
        replace, mask = ctx.mask(layer, args[0].dtype if args else kwargs["hidden_states"].dtype)
        if replace:
            kwargs["attention_mask"] = mask if mask is None or dev is None else mask.to(dev)
            kwargs["position_ids"] = None
        if self.var is not None and layer in ctx.cache.layer_codes:
            kwargs["mmsink"] = Directive(
                layer, reweight=var_steps.decode_reweight(ctx.cache, layer, self.var, self.var_compiled)
            )
        return args, kwargs

    def prefill_layer(self, ctx: Prefill, layer: int, dev, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if dev is not None and hidden.device != dev:  # layers spread over devices
            hidden = hidden.to(dev)
            ctx.to(dev)
        if layer == 0:
            ctx.position_embeddings = kwargs["position_embeddings"]
            if ctx.vit is not None:
                hidden = vitsink.place(ctx, hidden, self.sinks, self.sink_threshold)
            new = self.planner.before_llm(ctx, hidden)
            hidden = hidden if new is None else new
        hidden = ctx.advance(layer, hidden)
        seg = ctx.seg
        if not seg.full:
            kwargs["attention_mask"] = seg.mask(self.base, hidden.dtype)
            kwargs["position_embeddings"] = seg.position_embeddings(kwargs["position_embeddings"])
            kwargs["position_ids"] = None
        want = self.planner.directive(ctx, layer)
        ctx.directive = self.directive(ctx, layer, hidden, want)
        if ctx.directive is not None:
            kwargs["mmsink"] = ctx.directive
        ctx.slots.append(seg.n)
        # a directive of VAR's or of the ragged kernel's alone does not keep the layer here: generate_fast's
        # tail applies VAR itself and masks its own padding (the pruner's directive is what must run here)
        plain = ctx.directive is None or not want
        if ctx.handoff and plain and not args[1:]:
            known = ctx.final_layer
            if known == layer or (known is None and self.planner.settled(ctx, layer)):
                kwargs.pop("mmsink", None)
                raise Handoff(ctx, layer, hidden, kwargs)
        return (hidden, *args[1:]), kwargs

    def directive(self, ctx: Prefill, layer: int, hidden, planned: dict | None) -> Directive | None:
        """What this layer's attention must do beyond plain attention, or None. ``planned``: the pruner's
        directive for the layer."""
        want = dict(planned or {})
        var = self.var is not None and self.var.active(layer, self.num_layers) and "reweight" not in want
        if var:
            want["reweight"] = var_steps.prefill_reweight(ctx, layer, hidden, self.var, self.var_compiled)
        seg = ctx.seg
        # padding: a ragged kernel, no mask (not on masked slots: packing them needs their count, a read)
        if self.varlen and not seg.dense and not seg.masked and varlen.on_device(hidden):
            if "varlen" not in seg.cache:
                seg.cache["varlen"] = varlen.pack(seg.valid, seg.total)
            want["varlen"] = seg.cache["varlen"]
        if not want:
            return None
        d = Directive(layer, observe=bool(want.get("observe")), reweight=want.get("reweight"))
        d.varlen = want.get("varlen")
        d.rows = want.get("rows")  # query rows beyond the anchor a pruner scores with (observe)
        if d.observe:
            d.anchor = ctx.anchor_slot()
            if var:  # (its codes come with the attention call)
                d.observed["edit_probs"] = var_steps.anchor_edit(ctx, layer, d.anchor, self.var)
        return d

    def layer_post(self, layer: int):
        def hook(module, args, output):
            ctx = self.ctx
            if not isinstance(ctx, Prefill):
                return None
            d = ctx.directive
            hidden = output[0] if isinstance(output, tuple) else output
            self.planner.after_layer(ctx, layer, hidden, d.observed if d is not None else {})
            if d is not None:
                d.observed.clear()
            return None

        return hook

    # ------------------------------------------------------------------ stats
    def deferred(self, subject, kwargs):
        """Stats are built when ``stats(model)`` asks (their host work and device reads stay off the
        forward path); the family's vision counters, which the next forward resets, are read now."""
        pix = kwargs.get("pixel_values")
        vision = (self.family.vision_flops(pix, kwargs), self.family.image_vision_flops(pix, kwargs))
        keep = kwargs.get("logits_to_keep", 0)
        if not isinstance(subject, Prefill):
            return functools.partial(plain_stats, self.meter, subject, keep, vision)
        subject.kwargs = subject.cache = subject.directive = None  # keep no inputs or KV cache alive
        # nor rotary tables or states the stats do not read (a batch prefilled in chunks keeps every chunk's)
        subject.taps, subject.position_embeddings, subject.pending_hidden = {}, None, None
        return functools.partial(prefill_stats, self.meter, subject, keep, vision, self.planner.report)
