"""The handle that ``wrap`` attaches to one model instance: settings, hooks, the last Stats.

Everything is per instance: hooks on this model's modules, its own text config's attention name, a
``generate`` bound on the instance. ``unwrap`` removes exactly these.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from transformers.cache_utils import DynamicCache

from . import attention, varlen, vitsink
from .attention import Directive, build_mask, group_indices
from .cache import PlanCache
from .flops import DecoderCost, lm_rows
from .plan import Prefill, gather_rows, layer_device
from .pruners import REGISTRY
from .stats import Stats
from .var import VARConfig, key_codes, make_config, redistribute_rows, var_attention

ATTR = "_mmsink"


class Handoff(Exception):
    """Raised by the layer hook where a prefill's plan is final, when ``generate_fast`` asked for it:
    it carries the hidden states and the layer's call arguments so that the remaining layers can run
    as one captured graph. Never escapes ``generate_fast``."""

    def __init__(self, ctx, layer: int, hidden, kwargs):
        super().__init__("mmsink: prefill handoff")
        self.ctx, self.layer, self.hidden, self.kwargs = ctx, layer, hidden, kwargs


SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")


class Decode:
    """Per-forward state of a cached decode step: masks per segment of the PlanCache."""

    def __init__(self, cache: PlanCache, base: str, n_q: int):
        self.cache, self.base, self.n_q = cache, base, n_q
        self.masks: dict = {}

    def mask(self, layer: int, dtype):
        """(replace?, mask) for a layer: full segments keep transformers' own mask."""
        seg = self.cache.layer_segment[layer]
        if self.cache.segment_full[seg]:
            return False, None
        if seg not in self.masks:
            self.masks[seg] = build_mask(self.base, self.cache.segment_valid[seg], self.n_q, dtype)
        return True, self.masks[seg]


class Handle:
    def __init__(self, model, family, pruner, settings: dict, var: VARConfig | None = None, sinks=None):
        self.model = model
        self.family = family
        self.pruner = pruner
        self.var = var
        self.sinks = sinks
        self.sink_threshold = None
        if sinks is not None:
            self.sink_threshold = sinks.threshold or vitsink.known_threshold(family.config.vision_config)
        # VAR without a pruner still needs the plan machinery: a pruner that keeps everything
        self.planner = pruner if pruner is not None else REGISTRY["none"]()
        self.settings = settings
        self.enabled = True
        self.ctx = None
        self.measuring = False  # a prefill is running: families count vision work
        self.last_layout = None
        self.layout_ids = None  # the input ids the last layout was built from
        self.prompt_len: int | None = None
        self.last_stats = None  # Stats, or a function building them (see ``deferred``)
        self.hooks: list = []
        self.vision_taps: list = []  # (module, hook) pairs inside the vision tower (VisionZip's scores)
        self.handoff = False  # set by generate_fast: stop the prefill where the plan is final
        self.base = family.text_config._attn_implementation or "eager"
        # padded prefill segments on a ragged FlashAttention kernel (SDPA base; used where tensors allow)
        self.varlen = (
            settings.get("varlen") is not False and self.base == "sdpa" and varlen.kernel() is not None
        )
        if self.base not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"mmsink: attention implementation {self.base!r} is not supported; "
                f"use one of {SUPPORTED_ATTENTION}"
            )
        self.cost = DecoderCost.of(family.layers, family.text_config)
        self.num_layers = len(family.layers)
        if var is not None:
            var.check_model(self.num_layers, family.text_config.hidden_size)
        if pruner is not None:
            pruner.check_model(self.num_layers)
            n = family.tokens_per_image
            if isinstance(pruner.budget, int) and n and pruner.budget > n:
                raise ValueError(
                    f"mmsink: budget {pruner.budget} is larger than the image's {n} visual tokens"
                )

    # ------------------------------------------------------------------ attach / detach
    def attach(self):
        attention.register()
        self.family.text_config._attn_implementation = attention.registered_name(self.base)
        m = self.model
        self.hooks.append(m.register_forward_pre_hook(self.model_pre, with_kwargs=True))
        self.hooks.append(m.register_forward_hook(self.model_post, with_kwargs=True))
        self.hooks.append(self.family.language_model.register_forward_hook(self.lm_post))
        self.hooks += self.family.install(self)
        if self.sinks is not None or getattr(self.planner, "uses_vision", False):
            self.hooks.append(self.family.projector.register_forward_pre_hook(self.projector_pre))
        if getattr(self.planner, "uses_vision", False):
            self.hooks += self.family.install_vision_scoring(self)
        for i, layer in enumerate(self.family.layers):
            self.hooks.append(layer.register_forward_pre_hook(self.layer_pre(i), with_kwargs=True))
            self.hooks.append(layer.register_forward_hook(self.layer_post(i)))
        handle = self

        def generate(model_self, *args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            prev = handle.prompt_len
            handle.prompt_len = ids.shape[1] if isinstance(ids, torch.Tensor) else None
            try:
                return type(model_self).generate(model_self, *args, **kwargs)
            finally:
                handle.prompt_len = prev

        m.generate = types.MethodType(generate, m)
        object.__setattr__(m, ATTR, self)

    def detach(self):
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.family.text_config._attn_implementation = self.base
        m = self.model
        if "generate" in m.__dict__:
            del m.__dict__["generate"]
        if ATTR in m.__dict__:
            object.__delattr__(m, ATTR)
        self.ctx = None

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
            n_q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
            am = kwargs.get("attention_mask")
            dev = pkv.segment_valid[0].device
            new = am[:, -n_q:].bool() if am is not None and am.dim() == 2 else None
            if new is None:
                new = torch.ones(pkv.segment_valid[0].shape[0], n_q, dtype=torch.bool, device=dev)
            pkv.append_tokens(new)
            self.ctx = Decode(pkv, self.base, n_q)
            return None
        if pkv is not None and pkv.get_seq_length() > 0:
            return None  # a cache this wrapper did not plan (e.g. filled under disabled())
        if ids is None:
            if (self.pruner is not None and self.pruner.name != "none") or self.var is not None:
                raise ValueError("mmsink: pass input_ids (not inputs_embeds) so image tokens can be located")
            return None
        self.measuring = True
        self.family.reset_measure()
        grids = getattr(self.planner, "uses_grids", False)
        layout = self.family.layout(ids, kwargs.get("attention_mask"), self.prompt_len, kwargs, grids)
        self.last_layout, self.layout_ids = layout, ids
        if layout.dense and kwargs.get("pixel_values") is not None:
            # no padding: no mask (transformers would read an all-ones mask on the device to skip it)
            kwargs["attention_mask"] = None
        if not any(layout.sizes) or (self.pruner is None and self.var is None and self.sinks is None):
            return None  # no image (or nothing to do): the model runs untouched
        ctx = Prefill(layout, self.num_layers, self.base)
        ctx.budget_per = self.planner.budget_per
        ctx.lm = self.family.lm_parts
        ctx.var_codes = {}
        ctx.vit = None
        self.planner.start(ctx)
        ctx.final_layer = None
        ctx.handoff = self.handoff and self.var is None
        if ctx.handoff:
            ctx.final_layer = self.planner.final_layer(ctx)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.family.text_config, "use_cache", True)
        ctx.cache = None
        if use_cache:
            if pkv is not None and type(pkv) not in (DynamicCache, PlanCache):
                raise ValueError(
                    f"mmsink: {type(pkv).__name__} is not supported with pruning; "
                    "use the default dynamic cache"
                )
            ctx.cache = pkv if isinstance(pkv, PlanCache) else PlanCache(config=self.family.text_config)
            kwargs["past_key_values"] = ctx.cache
        ctx.kwargs = kwargs
        self.ctx = ctx
        return args, kwargs

    def model_post(self, module, args, kwargs, output):
        ctx, self.ctx = self.ctx, None
        if self.measuring and ctx is None:  # an untouched prefill; vision work is known only now
            self.last_stats = self.deferred(self.plain_stats, self.last_layout, kwargs)
        self.measuring = False
        if isinstance(ctx, Decode):
            ctx.cache.commit(ctx.n_q)
        if isinstance(ctx, Prefill):
            ctx.to(ctx.home)  # back where the call started when layers were on several devices
            if ctx.cache is not None:
                ctx.cache.set_plan(
                    ctx.layer_segment,
                    [s.valid for s in ctx.segments],
                    [s.full for s in ctx.segments],
                    ctx.layout.length,
                    ctx.var_codes,
                )
            self.last_stats = self.deferred(self.prefill_stats, ctx, kwargs)
        return None

    def finish_handoff(self, h: Handoff, kwargs) -> None:
        """The bookkeeping of a prefill whose layers from ``h.layer`` on ran outside the model (in
        ``generate_fast``): they all ran on the final segment."""
        ctx = h.ctx
        for _ in range(h.layer + 1, self.num_layers):
            ctx.layer_segment.append(len(ctx.segments) - 1)
            ctx.slots.append(ctx.seg.n)
        self.ctx, self.measuring = None, False
        ctx.to(ctx.home)
        self.last_stats = self.deferred(self.prefill_stats, ctx, kwargs)

    def lm_post(self, module, args, output):
        ctx = self.ctx
        if not isinstance(ctx, Prefill) or ctx.seg.full:
            return None
        out = output.last_hidden_state
        seg = ctx.seg
        length = ctx.layout.length
        # back to full length by a scatter of fixed shape (no boolean indexing: no device sync); padding
        # slots write to one extra column that is cut off
        full = out.new_zeros(ctx.layout.batch, length + 1, out.shape[-1])
        idx = torch.where(seg.valid, seg.idx, length).to(out.device)
        full.scatter_(1, idx[..., None].expand(-1, -1, out.shape[-1]), out)
        output.last_hidden_state = full[:, :length]
        return output

    # ------------------------------------------------------------------ layer hooks
    def layer_pre(self, layer: int):
        weight = next(self.family.layers[layer].parameters(), None)

        def hook(module, args, kwargs):
            ctx = self.ctx
            if ctx is None:
                return None
            dev = layer_device(module, weight)
            if isinstance(ctx, Decode):
                replace, mask = ctx.mask(layer, args[0].dtype if args else kwargs["hidden_states"].dtype)
                if replace:
                    kwargs["attention_mask"] = mask if mask is None or dev is None else mask.to(dev)
                    kwargs["position_ids"] = None
                if self.var is not None and layer in ctx.cache.layer_codes:
                    kwargs["mmsink"] = Directive(layer, reweight=self.var_decode(ctx, layer))
                return args, kwargs
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if dev is not None and hidden.device != dev:  # layers spread over devices
                hidden = hidden.to(dev)
                ctx.to(dev)
            if layer == 0:
                ctx.position_embeddings = kwargs["position_embeddings"]
                if ctx.vit is not None:
                    hidden = self.place_sinks(ctx, hidden)
                new = self.planner.before_llm(ctx, hidden)
                hidden = hidden if new is None else new
            hidden = ctx.advance(layer, hidden)
            seg = ctx.seg
            if not seg.full:
                kwargs["attention_mask"] = seg.mask(self.base, hidden.dtype)
                kwargs["position_embeddings"] = seg.position_embeddings(kwargs["position_embeddings"])
                kwargs["position_ids"] = None
            want = dict(self.planner.directive(ctx, layer) or {})
            if self.var is not None and self.var.active(layer, self.num_layers) and "reweight" not in want:
                want["reweight"] = self.var_prefill(ctx, layer, hidden)
            # padding: a ragged kernel, no mask
            if self.varlen and not seg.dense and varlen.on_device(hidden):
                if "varlen" not in seg.cache:
                    seg.cache["varlen"] = varlen.pack(seg.valid, seg.total)
                want["varlen"] = seg.cache["varlen"]
            if want:
                d = Directive(layer, observe=bool(want.get("observe")), reweight=want.get("reweight"))
                d.varlen = want.get("varlen")
                if d.observe:
                    d.anchor = ctx.anchor_slot()
                    if layer in ctx.var_codes:
                        d.observed["edit_probs"] = self.var_anchor_edit(ctx, layer, d.anchor)
                kwargs["mmsink"] = d
                ctx.directive = d
            else:
                ctx.directive = None
            ctx.slots.append(seg.n)
            if ctx.handoff and ctx.directive is None and not args[1:]:
                known = ctx.final_layer
                if known == layer or (known is None and self.planner.settled(ctx, layer)):
                    raise Handoff(ctx, layer, hidden, kwargs)
            return (hidden, *args[1:]), kwargs

        return hook

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

    # ------------------------------------------------------------------ ViT sinks
    def vision_observer(self, fn):
        def hook(module, args, output):
            if isinstance(self.ctx, Prefill):
                fn(self.ctx, output)

        return hook

    def projector_pre(self, module, args):
        ctx = self.ctx
        if not isinstance(ctx, Prefill):
            return None
        features = args[0]
        if self.sinks is not None:
            ctx.vit = self.family.vit_norms(features, ctx.kwargs)
        if getattr(self.planner, "uses_vision", False):
            features = self.family.zip_features(self.planner, ctx, features)
            return (features, *args[1:])
        return None

    def place_sinks(self, ctx: Prefill, hidden):
        """Detect sinks per image; protect them; with to_front, move them to the front of their span."""
        norms_per_image = ctx.vit
        lay = ctx.layout
        flat = lay.is_image.nonzero()  # (sample, position) of every image token, in feature order
        if flat.shape[0] != sum(n.numel() for n in norms_per_image):
            raise ValueError("mmsink: image features and image tokens do not line up for sink detection")
        sinks = [vitsink.detect(n, self.sinks, self.sink_threshold) for n in norms_per_image]
        orders, start = [], 0
        for s in sinks:
            order = (
                vitsink.to_front_order(s) if self.sinks.to_front else torch.arange(s.numel(), device=s.device)
            )
            orders.append(order + start)
            start += s.numel()
        order = torch.cat(orders)
        sink, norms = torch.cat(sinks)[order], torch.cat(norms_per_image)[order]
        patch = torch.cat([torch.arange(s.numel(), device=s.device) for s in sinks])[order]
        if self.sinks.to_front:
            hidden = hidden.clone()
            hidden[flat[:, 0], flat[:, 1]] = hidden[flat[:, 0], flat[:, 1]][order.to(hidden.device)]
        ctx.protected = torch.zeros_like(lay.is_image)
        ctx.protected[flat[:, 0], flat[:, 1]] = sink.to(lay.is_image.device)
        ctx.vit_sinks = [[] for _ in range(lay.batch)]
        for i in sink.nonzero().squeeze(1).tolist():
            b, pos = flat[i].tolist()
            ctx.vit_sinks[b].append(
                {"position": pos, "patch": int(patch[i]), "norm": round(float(norms[i]), 3)}
            )
        return hidden

    # ------------------------------------------------------------------ VAR
    def var_prefill(self, ctx: Prefill, layer: int, hidden):
        seg = ctx.seg
        vis = ctx.visual()
        codes = key_codes(hidden, vis, ctx.in_prompt(), self.var)
        ctx.var_codes[layer] = codes
        if "var_rows" not in seg.cache:  # instruction, answer and later tokens; indexed once per segment
            rows = seg.valid & ~vis & (vis.cumsum(1) > 0)
            seg.cache["var_rows"] = group_indices(rows, ctx.text_after_image_width())
        rows = seg.cache["var_rows"]

        def reweight(q, k, v, mask, scale, base):
            out, flops = var_attention(q, k, v, mask, seg.valid, scale, base, codes, rows, self.var)
            ctx.attn_flops[layer] = flops
            return out

        return reweight

    def var_anchor_edit(self, ctx: Prefill, layer: int, anchor):
        codes = ctx.var_codes[layer]
        vis = ctx.visual()
        after_image = vis.cumsum(1).gather(1, anchor[:, None])[:, 0] > 0
        return lambda probs: redistribute_rows(
            probs, codes, after_image & ~vis.gather(1, anchor[:, None])[:, 0], self.var
        )

    def var_decode(self, ctx: Decode, layer: int):
        cache = ctx.cache
        codes = cache.layer_codes[layer]
        valid = cache.segment_valid[cache.layer_segment[layer]]

        def reweight(q, k, v, mask, scale, base):
            rows = torch.arange(q.shape[2], device=q.device).expand(q.shape[0], -1)  # every new row
            c, ok = codes.to(q.device), valid.to(q.device)
            return var_attention(q, k, v, mask, ok, scale, base, c, rows, self.var)[0]

        return reweight

    # ------------------------------------------------------------------ stats
    def deferred(self, build, subject, kwargs):
        """Stats are built when ``stats(model)`` asks (their host work and device reads stay off the
        forward path); the family's vision counters, which the next forward resets, are read now."""
        pix = kwargs.get("pixel_values")
        vision = (self.family.vision_flops(pix, kwargs), self.family.image_vision_flops(pix, kwargs))
        if isinstance(subject, Prefill):  # keep no inputs, activations or KV cache alive for it
            subject.kwargs = subject.cache = subject.directive = None
        return functools.partial(build, subject, {"logits_to_keep": kwargs.get("logits_to_keep", 0)}, vision)

    def sample_flops(self, lay, per_image, tokens, rows, extra):
        """What each sample would execute alone (no padding): its own tokens per layer, its images."""
        images = (lay.image_counts() > 0).sum(1).tolist()
        real = lay.valid.sum(1).tolist()
        out, base = [], []
        for i, per_layer in enumerate(tokens):
            r = min(rows, real[i])
            first = sum(images[:i])
            v = sum(per_image[first : first + images[i]])
            out.append(int(v + self.cost.prefill(1, per_layer, r) + extra))
            base.append(int(v + self.cost.prefill(1, [real[i]] * self.num_layers, r)))
        return out, base

    def plain_stats(self, layout, kwargs, vision) -> Stats:
        b, length = layout.batch, layout.length
        rows = lm_rows(kwargs.get("logits_to_keep", 0), length)
        flops = vision[0] + self.cost.prefill(b, [length] * self.num_layers, rows)
        vis = layout.is_image.sum(1).tolist()
        idx = [layout.is_image[i].nonzero().squeeze(1).tolist() for i in range(b)]
        real = layout.valid.sum(1).tolist()
        sample, _ = self.sample_flops(layout, vision[1], [[n] * self.num_layers for n in real], rows, 0)
        return Stats(
            self.pruner.name if self.pruner else None,
            getattr(self.pruner, "budget", None),
            [vis] * self.num_layers,
            [idx] * self.num_layers,
            vis,
            flops,
            flops,
            [length] * self.num_layers,
            {"sample_prefill_flops": sample, "sample_baseline_prefill_flops": sample},
        )

    def prefill_stats(self, ctx: Prefill, kwargs, vision) -> Stats:
        lay = ctx.layout
        b, length = lay.batch, lay.length
        rows = lm_rows(kwargs.get("logits_to_keep", 0), length)
        flops = vision[0] + self.cost.prefill(b, ctx.slots, rows, ctx.attn_flops) + ctx.extra_flops
        base = vision[0] + self.cost.prefill(b, [length] * self.num_layers, rows)
        per_seg_idx = []
        for s in ctx.segments:
            vis = gather_rows(lay.is_image, s.idx) & s.valid
            per_seg_idx.append([s.idx[i][vis[i]].tolist() for i in range(b)])
        kept_idx = [per_seg_idx[s] for s in ctx.layer_segment]
        kept = [[len(x) for x in row] for row in kept_idx]
        valid_counts = [s.valid.sum(1).tolist() for s in ctx.segments]
        per_sample = [[valid_counts[s][i] for s in ctx.layer_segment] for i in range(b)]
        sample, sample_base = self.sample_flops(lay, vision[1], per_sample, rows, ctx.extra_flops / b)
        extra = {"sample_prefill_flops": sample, "sample_baseline_prefill_flops": sample_base}
        if isinstance(ctx.run, dict) and "fused_at" in ctx.run:
            extra["fusion_layer"] = ctx.run["fused_at"].tolist()
        if ctx.vit is not None:
            extra["vit_sinks"] = getattr(ctx, "vit_sinks", [[] for _ in range(b)])
        if ctx.var_codes:
            extra["var_sinks"] = {
                layer: {"visual": (c == 2).sum(1).tolist(), "text": (c == 1).sum(1).tolist()}
                for layer, c in ctx.var_codes.items()
            }
        if isinstance(ctx.run, dict) and "layers" in ctx.run:
            extra["schedule"] = {"layers": list(ctx.run["layers"]), "ratio": ctx.run["ratio"]}
        return Stats(
            self.pruner.name if self.pruner else None,
            self.pruner.budget if self.pruner else None,
            kept,
            kept_idx,
            lay.is_image.sum(1).tolist(),
            flops,
            base,
            list(ctx.slots),
            extra,
        )


# ---------------------------------------------------------------------- public functions


def make_pruner(prune, budget, options):
    if prune is None:
        if budget is not None or options:
            raise ValueError("mmsink: budget and method options need a method (prune=...)")
        return None
    if not isinstance(prune, str) or prune not in REGISTRY:
        raise ValueError(f"mmsink: unknown method {prune!r}; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[prune](budget=budget, **options)


def wrap(model, prune=None, budget=None, var=False, sink_forward=False, config=None, varlen=None, **options):
    """Attach mmsink to ``model`` (in place; returns it). Re-wrapping replaces the settings.
    ``config``: a file written by ``mmsink calibrate``; it supplies VAR's sink dimensions, the ViT-sink
    threshold and VisiPruner's fallback layer where the call does not give them.
    ``varlen``: padded prefill segments through a variable-length FlashAttention kernel (default: where
    available, i.e. CUDA, fp16 / bf16, SDPA models; ``True`` requires a kernel, ``False`` turns it off)."""
    if varlen not in (None, True, False):
        raise ValueError(f"mmsink: varlen must be None, True or False, got {varlen!r}")
    if varlen is True and attention.varlen.kernel() is None:
        raise ValueError("mmsink: varlen=True needs torch.nn.attention.varlen or the flash_attn package")
    if config is not None:
        from .calibrate import load_config

        cal = load_config(config)
        if var is True or (isinstance(var, dict) and "sink_dims" not in var):
            var = {**(var if isinstance(var, dict) else {}), "sink_dims": cal["sink_dims"]}
        if sink_forward is True and cal.get("vit_sink_threshold"):
            sink_forward = {"threshold": cal["vit_sink_threshold"]}
        if prune == "visipruner" and budget is not None and cal.get("fusion_layer") is not None:
            options.setdefault("fallback_layer", cal["fusion_layer"])
    var_cfg = make_config(var)
    sink_cfg = vitsink.make_config(sink_forward)
    family_for = load_patches().family_for

    pruner = make_pruner(prune, budget, options)
    family = family_for(model)
    old = getattr(model, "__dict__", {}).get(ATTR)
    if old is not None:
        old.detach()
    settings = {"prune": prune, "budget": budget, "var": var_cfg, "sink_forward": sink_cfg, **options}
    if varlen is not None:
        settings["varlen"] = varlen
    try:
        handle = Handle(model, family, pruner, settings, var_cfg, sink_cfg)
    except Exception:
        if old is not None:  # refused settings leave the previous wrap in place
            old.attach()
        raise
    handle.attach()
    return model


def load_patches():
    """``mmsink.patches`` as installed; from a source checkout, the top-level ``patches/`` folder."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    try:
        return importlib.import_module("mmsink.patches")
    except ModuleNotFoundError:
        src = Path(__file__).resolve().parent.parent / "patches"
        spec = importlib.util.spec_from_file_location(
            "mmsink.patches", src / "__init__.py", submodule_search_locations=[str(src)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["mmsink.patches"] = module
        spec.loader.exec_module(module)
        return module


def get_handle(model) -> Handle:
    h = getattr(model, "__dict__", {}).get(ATTR)
    if h is None:
        raise ValueError("mmsink: this model is not wrapped (call mmsink.wrap first)")
    return h


def unwrap(model):
    """Remove mmsink from ``model``: hooks, attention name and bound methods, and the decoders that
    ``generate_fast`` kept on it; returns the model."""
    from .fast import clear

    get_handle(model).detach()
    clear(model)
    return model


@contextlib.contextmanager
def disabled(model):
    """Run the untouched model (same weights) inside the block."""
    h = get_handle(model)
    prev, h.enabled = h.enabled, False
    name = h.family.text_config._attn_implementation
    h.family.text_config._attn_implementation = h.base
    try:
        yield model
    finally:
        h.enabled = prev
        h.family.text_config._attn_implementation = name


def stats(model) -> Stats | None:
    """What the last prefill did (built on first request after it)."""
    h = get_handle(model)
    if callable(h.last_stats):
        h.last_stats = h.last_stats()
    return h.last_stats


def methods() -> list[str]:
    return sorted(REGISTRY)
