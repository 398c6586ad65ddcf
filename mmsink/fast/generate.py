"""``generate_fast``: the (pruned) prefill through the wrapped model, handed off where its plan is final,
then greedy decoding on static per-layer buffers (``decode.FastDecoder``)."""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from ..core import layout
from ..core.compiling import can_compile
from ..core.hooks import ATTR, Handle, Handoff
from ..core.stats import Chunked
from ..pruners import REGISTRY
from ..sinks import var as var_steps
from . import vision_graph
from .decode import placement
from .store import decoder_for

# generate's options at the values generate_fast implements (greedy); other values are refused by name
GREEDY = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1}
CALLBACKS = (
    "logits_processor",
    "stopping_criteria",
    "streamer",
    "prefix_allowed_tokens_fn",
    "assistant_model",
)


@dataclass
class Prefilled:
    """What the prefill leaves for decoding."""

    tok: torch.Tensor  # [B] the first new token
    cache: object  # the model's cache (layers before a hand-off, or all of them)
    tail: tuple | None  # (first layer, its valid slots, earlier layers' valid slots) after a hand-off
    dec: object | None  # the decoder the hand-off's tail layers already wrote into
    mask: torch.Tensor  # [B, L] the prompt's attention mask
    loaded: list | None = None  # prefill_batch: every row already in ``dec``; the decode's first slots
    delta: torch.Tensor | None = None  # [B, 1] rope deltas (M-RoPE) not kept on the model: the chunks',
    # or a text-only prompt's (zero)

    def rope_deltas(self, family) -> torch.Tensor:
        """[B, 1] the rope deltas decoding continues from: this prefill's own, else the model's kept ones."""
        return self.delta if self.delta is not None else family.rope_deltas()


def generation_options(inputs: dict) -> set:
    """The keys of ``inputs`` that are generate's options rather than model inputs."""
    return set(inputs) & option_names()


@functools.cache
def option_names() -> frozenset:
    """generate's option names (a GenerationConfig's fields: built once, not per call) and callbacks."""
    return frozenset(GenerationConfig().to_dict()) | frozenset(CALLBACKS)


def check_inputs(inputs: dict, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"mmsink: max_new_tokens must be >= 1, got {max_new_tokens}")
    for name in sorted(generation_options(inputs)):
        value = inputs[name]
        if value is None or (name in GREEDY and value == GREEDY[name]):
            continue
        raise ValueError(
            f"mmsink: generate_fast decodes greedily and does not implement {name}={value!r}; "
            "use model.generate"
        )


def prefill(
    model,
    family,
    handle,
    inputs: dict,
    graphs: bool,
    compile: bool,
    dispatched: bool,
    budget: int,
    opts=None,
    early: bool = True,
    into=None,
    tower_compile: bool = False,
    var_handoff: bool = True,
):
    """Run the prompt; where the plan becomes final the layer hook hands off and the remaining layers run
    on the decoder's buffers here (one graph per shape when ``graphs``). ``into``: (decoder or None,
    rows, whole batch, prefill_batch) for one chunk of a batch prefilled in chunks: the tail writes the
    chunk's rows of that decoder (one for the whole batch made here when None). ``tower_compile``: the
    tower's layers through ``torch.compile``; ``var_handoff``: a VAR prefill hands off too."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    options = generation_options(inputs)
    call = {k: v for k, v in inputs.items() if k not in options} | {"attention_mask": mask}
    live = handle is not None and handle.enabled
    grids = ("image_grid_thw", "video_grid_thw", "position_ids")
    text_only = family.mrope and all(call.get(k) is None for k in grids)
    flat = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device) if text_only else None
    handoff = not dispatched and (var_handoff or not live or handle.var is None)
    # positions made below (1-D) start at 0 on each sample's first real token
    local = not family.mrope and "position_ids" not in call
    session = handle.session(ids.shape[1], handoff, local) if handle is not None else nullcontext()
    tower = nullcontext()
    if graphs and not dispatched and inputs.get("pixel_values") is not None:
        taps = handle.vision_taps if live else []
        if vision_graph.usable(model, family=family):  # (the family passed: made once a call)
            tower = vision_graph.patched(model, taps, compile=compile and tower_compile, family=family)
        elif compile and tower_compile:  # Qwen's tower (attention layout built on the host): blocks, no graph
            tower = vision_graph.compiled_blocks(model)
    try:
        with session, tower as graph, tower_first(family, graph if early else None, call, live):
            # positions as generate makes them for left-padded prompts (the decode step continues from
            # these); Qwen computes its 3-D positions (and rope deltas) itself
            if not family.mrope:
                call.setdefault("position_ids", (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1))
            elif flat is not None:  # no image or video: the model makes no 3-D positions nor rope deltas
                # (its kept deltas are an earlier prompt's); get_rope_index's for text-only rows: 0, 1, ..
                # over the real tokens on every axis, delta 0
                call["position_ids"] = (
                    (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[None].expand(3, -1, -1)
                )
            out = model(**call, use_cache=True, logits_to_keep=1)
    except Handoff as h:
        ctx, first = h.ctx, h.layer
        heads = [ctx.segments[ctx.layer_segment[i]].valid for i in range(first)]
        lengths = [v.shape[1] for v in heads] + [h.hidden.shape[1]] * (ctx.num_layers - first)
        stops = stop_ids(model)[0]
        dec, rows, batch, size = into if into is not None else (None, None, ids.shape[0], None)
        cfg, n = handle.var, ctx.num_layers
        edits = [i for i in range(first, n) if cfg.active(i, n)] if cfg is not None else []
        var = (cfg, sorted({*ctx.var_codes, *edits})) if cfg is not None else None
        if dec is None:
            dec = decoder_for(
                family, lengths, batch, max(budget - 1, 1), stops, graphs, compile, var, opts=opts
            )
        if rows is not None:
            check_room(dec, lengths, budget - 1, rows, size)
        if var is not None:
            check_var_layers(dec, var[1], rows, size)
            dec.var_compiled = handle.var_compiled  # (a kept decoder may come from an earlier wrap)
        plan = var_steps.tail_inputs(ctx) if edits else None
        tok = dec.run_tail(first, h.hidden, h.kwargs, graphs, rows, plan).to(ids.device)
        r = slice(None) if rows is None else rows
        codes = {i: dec.codes[i][r, : h.hidden.shape[1]].clone() for i in edits}  # (the buffer is reused)
        done = Prefilled(tok, ctx.cache, (first, ctx.seg.valid, heads), dec, mask, delta=flat)
        handle.finish_handoff(h, {**call, "logits_to_keep": 1}, codes)  # stats deferred: drops ctx's refs
        return done
    return Prefilled(out.logits[:, -1].argmax(-1), out.past_key_values, None, None, mask, delta=flat)


def prefill_chunks(
    model, family, handle, inputs: dict, size: int, max_new_tokens: int, run: dict, split: bool, early: bool
) -> Prefilled:
    """``prefill`` of the batch in consecutive row chunks of at most ``size`` (``generate_fast``'s
    ``prefill_batch``), each chunk's keys / values and valid slots loaded into its rows of one decoder for
    the whole batch (the first chunk's hand-off, or its cache's lengths, size it), and its cache dropped
    before the next chunk runs: the peak is the decoder's buffers plus one chunk's prefill. ``run``:
    generate_fast's graphs, compile and opts. ``mmsink.stats`` then describes the whole batch: each chunk's
    stats as its prefill ends, merged on request (``stats.Chunked``)."""
    ids = inputs["input_ids"]
    b = ids.shape[0]
    dec, toks, deltas, starts = None, [], [], None
    chunks = Chunked() if handle is not None and handle.enabled else None  # (disabled: no stats made)
    for rows, part in split_inputs(family, inputs, size):
        into = (dec, rows, b, size)
        g, c, o, more = run["graphs"], run["compile"], run["opts"], run["more"]
        p = prefill(model, family, handle, part, g, c, split, max_new_tokens, o, early, into, **more)
        if chunks is not None:
            handle.last_stats = chunks.add(rows, handle.last_stats)
        toks.append(p.tok)
        if family.mrope:
            deltas.append(p.rope_deltas(family))
        if max_new_tokens > 1:
            skip = 0
            if p.dec is None:  # the whole forward ran: its cache holds every layer
                if dec is None:
                    dec = cache_decoder(model, family, handle, p.cache, b, max_new_tokens, run)
                elif not getattr(p.cache, "planned", False):  # (untouched: a text-only chunk of a pruned
                    # batch) its slots are the batch's width: those padding in every row are not copied
                    skip = int(p.mask.bool().any(0).long().argmax())
                lengths = [layer.keys.shape[2] - skip for layer in p.cache.layers]
                check_room(dec, lengths, max_new_tokens - 1, rows, size)
            dec = p.dec if p.dec is not None else dec
            got = dec.load(p.cache, p.mask, p.tail, rows, skip)
            starts = got if starts is None else [max(x, y) for x, y in zip(starts, got)]
        p = None  # this chunk's cache goes before the next chunk's prefill
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    delta = torch.cat(deltas) if deltas else None
    return Prefilled(torch.cat(toks), None, None, dec, mask, starts, delta)


def check_room(dec, lengths: list[int], steps: int, rows: slice, size: int) -> None:
    """A chunk's per-layer slots plus the decode's ``steps`` fit the decoder the first chunk sized."""
    for i, (n, cap) in enumerate(zip(lengths, dec.caps)):
        if n + steps > cap:
            raise ValueError(
                f"mmsink: generate_fast's prefill_batch={size}: rows {rows.start}-{rows.stop - 1} keep {n} "
                f"slots in layer {i}, more than the {cap - steps} of the decoder the first chunk sized; "
                "use a larger prefill_batch or None"
            )


def check_var_layers(dec, layers: list[int], rows: slice | None, size: int | None) -> None:
    """The decoder keeps key codes for the layers where VAR edits this prefill (a chunk's decoder is the
    first chunk's: one left untouched by the wrap, without an image, keeps none)."""
    if rows is not None and sorted(dec.codes) != list(layers):
        raise ValueError(
            f"mmsink: generate_fast's prefill_batch={size}: rows {rows.start}-{rows.stop - 1} need VAR's "
            f"codes in layers {list(layers)}, the decoder the first chunk sized keeps them in "
            f"{sorted(dec.codes)} (a first chunk without an image); use prefill_batch=None"
        )


def split_inputs(family, inputs: dict, size: int) -> list:
    """[(rows, inputs of those rows)] for consecutive chunks of at most ``size`` rows: per-row tensors
    (first dim the batch) by rows; the images' pixel values, sizes and Qwen's grids by the chunk's images
    (images per row from the family's layout of the ids; Qwen packs its pixel rows image by image, as
    many as the image's grid has patches)."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    b = ids.shape[0]
    for name in ("pixel_values_videos", "video_grid_thw"):
        if inputs.get(name) is not None:
            raise ValueError(f"mmsink: generate_fast's prefill_batch does not split videos ({name}) yet")
    pix, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
    images = units = None
    if pix is not None:
        lay = family.layout(ids, torch.ones_like(ids) if mask is None else mask, None)
        images = [0]
        for sizes in lay.sizes:
            images.append(images[-1] + len(sizes))
        per = [1] * images[-1] if grid is None else grid.prod(-1).tolist()
        units = [sum(per[:i]) for i in images]
        if len(per) != images[-1] or units[-1] != pix.shape[0]:
            raise ValueError(
                f"mmsink: generate_fast's prefill_batch: the prompts hold {images[-1]} images, pixel_values "
                f"{pix.shape[0]} rows for {len(per)}; cannot split them by rows"
            )
    out = []
    for lo in range(0, b, size):
        hi = min(lo + size, b)
        part = {}
        for k, v in inputs.items():
            if k in PER_IMAGE and v is not None and images is not None:
                cut = units if k == "pixel_values" else images
                part[k] = v[cut[lo] : cut[hi]] if images[hi] > images[lo] else None
            elif not isinstance(v, torch.Tensor) or v.dim() == 0:
                part[k] = v
            elif v.shape[0] == b:
                part[k] = v[lo:hi]
            else:
                raise ValueError(
                    f"mmsink: generate_fast's prefill_batch cannot split {k} (first dim {v.shape[0]}, not "
                    f"the batch {b})"
                )
        out.append((slice(lo, hi), part))
    return out


PER_IMAGE = ("pixel_values", "image_sizes", "image_grid_thw")  # one entry per image, not per row


@contextmanager
def tower_first(family, graph, call: dict, live: bool):
    """Launch the graphed vision tower before the forward (``vision_graph.GraphedTower.launch``), from the
    pixels as the family computes the tower's input, once its graph for that shape exists: the host's
    work up to the tower's call (the layout, the model's prologue) then runs while the GPU runs the
    tower. A wrapped model's layout reads host copies of the ids and mask queued before the tower
    (``layout.EARLY``), so its read does not wait for the tower."""
    x = key = None
    if graph is not None and hasattr(family, "tower_input"):
        family.host_inputs(call)  # image sizes to the host: the tower's input depends on them
        x = family.tower_input(call)
        key = graph.ready(x) if x is not None else None
    if key is None:
        yield
        return
    early = layout.host_copy(call["input_ids"], call["attention_mask"]) if live else None
    graph.launch(x, key)
    token = layout.EARLY.set(early)
    try:
        yield
    finally:
        layout.EARLY.reset(token)


def stop_ids(model) -> tuple:
    """(end-of-sequence ids as a tuple, pad id) from the model's generation config."""
    gen = model.generation_config
    eos = gen.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)
    return tuple(eos), pad


def decode(
    model, family, handle, p: Prefilled, ids, max_new_tokens: int, graphs: bool, compile: bool, opts=None
):
    """The new tokens [B, n] after the prompt (greedy, static buffers, one graph replay per token)."""
    new = p.tok[:, None]
    if max_new_tokens == 1:  # (before building eos: a tensor from host data, a blocking copy on a GPU)
        return new
    stops, pad = stop_ids(model)
    eos = torch.tensor(stops, dtype=torch.long, device=ids.device)
    if bool(torch.isin(p.tok, eos).all()):
        return new
    dec = p.dec
    if p.loaded is not None:  # prefilled in chunks, every row loaded: their caches are gone
        if graphs and not dec.captured():
            dec.rewind(p.loaded)
            dec.start_state(p.mask, p.tok, p.delta, pad)
            dec.capture()
        dec.rewind(p.loaded)  # (the capture's warm-up step undone)
        dec.start_state(p.mask, p.tok, p.delta, pad)
        steps = dec.run(max_new_tokens - 1)
        return torch.cat([new, dec.out[:, :steps].to(ids.device)], 1)
    if dec is None:
        run = dict(graphs=graphs, compile=compile, opts=opts)
        dec = cache_decoder(model, family, handle, p.cache, ids.shape[0], max_new_tokens, run)
    delta = p.rope_deltas(family) if dec.mrope else None  # [B, 1]
    if graphs and not dec.captured():
        dec.fill(p.cache, p.mask, p.tok, delta, pad, p.tail)
        dec.capture()
    dec.fill(p.cache, p.mask, p.tok, delta, pad, p.tail)
    p.cache = None  # copied into the decoder's buffers: not kept alive through decoding
    steps = dec.run(max_new_tokens - 1)
    return torch.cat([new, dec.out[:, :steps].to(ids.device)], 1)


def cache_decoder(model, family, handle, cache, batch: int, max_new_tokens: int, run: dict):
    """The decoder for a prefill that ran the whole forward (no hand-off), sized by its cache's layers;
    VAR's layers keep their keys' codes. ``run``: generate_fast's graphs, compile and opts."""
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    var_on = handle is not None and handle.var is not None and handle.enabled
    var = (handle.var, sorted(getattr(cache, "layer_codes", {}))) if var_on else None
    stops = stop_ids(model)[0]
    g, c, o = run["graphs"], run["compile"], run["opts"]
    dec = decoder_for(family, lengths, batch, max_new_tokens - 1, stops, g, c, var, o)
    if var_on:  # a kept decoder may come from an earlier wrap of this model (re-wrapped, not unwrapped)
        dec.var_compiled = handle.var_compiled
    return dec


@torch.no_grad()
def generate_fast(
    model,
    max_new_tokens: int = 32,
    graphs: bool | None = None,
    compile: bool | None = None,
    step=None,
    tower_first: bool = True,
    prefill_batch: int | None = None,
    tower_compile: bool = True,
    var_handoff: bool = True,
    **inputs,
) -> torch.Tensor:
    """Greedy decoding, the same tokens as ``model.generate(**inputs, do_sample=False)``: prompt ids followed
    by the new tokens, padded with the pad id after a sample's end-of-sequence token. ``graphs``: one CUDA
    graph per token (default: on for CUDA models). ``compile``: ``torch.compile`` the layer step (default: on
    CUDA when Triton is installed; the first call compiles, seconds). ``step``:
    ``mmsink.fast.fuse.StepOptions`` or a dict of its fields (fused projections, one KV write, the attention
    kernel, the GEMV kernel with the residual add fused; default: ``fuse`` with the attention kernel and the
    GEMV where graphs and compile run on one GPU, else none; ``{}``: the plain step).
    With ``fuse`` the model's q / k / v and gate / up weights share one tensor each until ``mmsink.unwrap`` or
    ``mmsink.fast.clear(model)``. An unwrapped model's prompt runs as under ``wrap(prune="none")`` (every
    layer in the decoder's tail, one graph), through a handle attached for the call. ``tower_first``:
    launch a graphed vision tower before the forward (off: the tower runs inside it, for A/B timing; same
    tokens). ``prefill_batch``: a batch of more rows is prefilled
    in consecutive row chunks of at most this many, each loaded into its rows of the one decoder of the whole
    batch, its prefill's cache and activations gone before the next chunk; then all rows decode together (the
    same tokens; the peak memory holds one chunk's prefill, not the batch's). ``mmsink.stats`` then describes
    the whole batch, its chunks' stats merged (``mmsink.core.stats.merge``: per-sample lists in batch order,
    FLOPs summed). None: the whole batch at once. ``tower_compile``: with ``compile``, the graphed vision
    tower's layers (Qwen's tower blocks, not graphed) through ``torch.compile`` (the same tokens; off: the
    tower's own layers, for A/B timing). ``var_handoff``: a VAR prefill hands off to the decoder's (graphed,
    compiled) layers where its plan is final, as other prefills do (off: the whole prefill in the model's
    forward, for A/B timing)."""
    from ..patches import family_for
    from .fuse import default_options

    handle = getattr(model, "__dict__", {}).get(ATTR)
    family = handle.family if handle is not None else family_for(model)  # (the wrap's: its kept maps)
    check_inputs(inputs, max_new_tokens)
    ids = inputs["input_ids"]
    if prefill_batch is not None and (
        isinstance(prefill_batch, bool) or not isinstance(prefill_batch, int) or prefill_batch < 1
    ):
        raise ValueError(f"mmsink: prefill_batch must be a positive integer or None, got {prefill_batch!r}")
    chunked = prefill_batch is not None and ids.shape[0] > prefill_batch
    kv = getattr(handle, "kv", None) if handle is not None and handle.enabled else None
    devices, dispatched = placement(model)
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            "mmsink: generate_fast needs every weight in memory (this model offloads layers through "
            "accelerate's device_map); use model.generate"
        )
    one_device = len(devices) == 1
    # graphs on by default on GPUs, VAR's decode step too (verified on the H200 by tests/test_gpu.py's
    # test_cuda_var_decode_equals_generate). A model split over GPUs: one graph per GPU (FastDecoder.stages)
    on_gpus = ids.is_cuda and all(d.type == "cuda" for d in devices)
    graphs = on_gpus if graphs is None else graphs
    compile = can_compile(ids.device) if compile is None else compile
    more = dict(tower_compile=tower_compile, var_handoff=var_handoff)
    split = dispatched or not one_device
    opts = default_options(step, bool(graphs and compile and on_gpus and not split and kv is None))
    # unwrapped: the prompt as prune="none" runs it (every layer in the tail), through a handle of this call
    own = unpruned_handle(model, family) if handle is None and not split else None
    handle = own if own is not None else handle
    try:
        if kv is not None:  # sink + window: mmsink.kv.fast; LFPS: kv.fast_sparse; quant: kv.fast_quant
            from ..kv.fast import generate_window
            from ..kv.fast_quant import generate_quant
            from ..kv.fast_sparse import generate_sparse

            mode = "sparse" if kv.sparse is not None else "quant" if kv.quant is not None else "window"
            if split:
                raise ValueError(f"mmsink: generate_fast's kv {mode} mode needs the model on one device")
            if opts is not None:
                raise ValueError(
                    f"mmsink: generate_fast's step= options do not apply to the kv {mode} mode yet"
                )
            if prefill_batch is not None:
                raise ValueError(
                    f"mmsink: generate_fast's prefill_batch does not apply to the kv {mode} mode yet"
                )
            p = prefill(model, family, handle, inputs, False, compile, True, max_new_tokens)
            run = {"sparse": generate_sparse, "quant": generate_quant, "window": generate_window}[mode]
            new = run(family, handle, p, ids, max_new_tokens, graphs, compile, stop_ids(model))
            return finish(ids, new, model)
        if chunked:
            run = dict(graphs=graphs, compile=compile, opts=opts, more=more)
            p = prefill_chunks(
                model, family, handle, inputs, prefill_batch, max_new_tokens, run, split, tower_first
            )
        else:
            p = prefill(
                model,
                family,
                handle,
                inputs,
                graphs,
                compile,
                split,
                max_new_tokens,
                opts,
                tower_first,
                **more,
            )
        new = decode(model, family, handle, p, ids, max_new_tokens, graphs, compile, opts)
        return finish(ids, new, model)
    finally:
        if own is not None:
            own.detach()


def unpruned_handle(model, family):
    """A handle that prunes nothing, attached for one ``generate_fast`` call of an unwrapped model: its
    prefill then hands off before the first layer, so every layer runs in the decoder's (graphed) tail, as
    under ``wrap(prune="none")``; removed after the call (hooks, attention entry). None where the model's
    attention is not one mmsink runs (the model's own forward then)."""
    try:
        # "none", not None (no pruner: the model's own forward); no varlen, so no layer gets a directive
        handle = Handle(model, family, REGISTRY["none"](), use_varlen=False)
    except ValueError:
        return None
    handle.attach(own_attention=False)  # no directive ever: the model's attention runs any layer it runs
    return handle


def finish(ids, new, model) -> torch.Tensor:
    """Prompt ids and new tokens, cut where every sample has ended."""
    out_ids = torch.cat([ids, new], 1)
    stops = stop_ids(model)[0]
    if new.shape[1] == 1 or not stops:  # nothing to cut
        return out_ids
    eos = torch.tensor(stops, dtype=torch.long, device=ids.device)
    # like generate: stop at the step where every sample has finished
    fin = torch.isin(out_ids[:, ids.shape[1] :], eos)
    if bool(fin.any(1).all()):
        last = int(fin.float().argmax(1).max())  # the latest first-eos over samples
        out_ids = out_ids[:, : ids.shape[1] + last + 1]
    return out_ids
