"""The decoders ``generate_fast`` keeps on a model (by shape, so a CUDA graph is captured once), and
``clear``, which drops them. Apart from ``decode`` so that the plain step (``decode``) and the optional
fused one (``fuse``) need not import each other."""

from __future__ import annotations

import collections
import dataclasses

from . import decode, vision_graph
from .decode import PLACED, ROUND, STORE, FastDecoder
from .fuse import StepDecoder, fused, unfuse


def decoder_for(
    family,
    lengths: list[int],
    batch: int,
    max_new: int,
    eos: tuple,
    graphs: bool,
    compile: bool,
    var=None,
    opts=None,
) -> FastDecoder:
    """A decoder whose buffers fit a prefill of ``lengths`` slots per layer: reused when one of the same
    shape is kept on the model. ``opts``: ``fuse.StepOptions`` (None: the plain step)."""
    model = family.model
    if opts is not None and opts.fuse:
        fused(model, family.layers)  # (again) where weights were replaced: drops the kept decoders
    need = [n + max_new for n in lengths]
    caps = [-(-n // ROUND) * ROUND for n in need]
    new = -(-max_new // ROUND) * ROUND
    var_key = None if var is None else (dataclasses.astuple(var[0]), tuple(var[1]))
    key = (batch, tuple(caps), new, eos, graphs, compile, var_key, opts)
    if opts is None:
        return kept_for(family, key, lambda: FastDecoder(family, caps, batch, new, eos, compile, var))
    return kept_for(family, key, lambda: StepDecoder(family, caps, batch, new, eos, compile, var, opts))


def kept(model, key, make):
    """The decoder kept on ``model`` under ``key``, else ``make()``'s, kept from now on: at most ``KEEP``
    decoders, the least recently used dropped first."""
    store = model.__dict__.setdefault(STORE, collections.OrderedDict())
    if key in store:
        store.move_to_end(key)
        return store[key]
    while len(store) >= decode.KEEP:  # read here, so a bench can raise it
        store.popitem(last=False)
    dec = store[key] = make()
    return dec


def kept_for(family, key: tuple, make):
    """``kept`` for a decoder of ``family``'s model, the key completed by the weights it runs on (swapped
    weights: a new decoder and graph)."""
    model = family.model
    params = (model.lm_head.weight.data_ptr(), model.lm_head.weight.dtype)
    return kept(model, (*key, params), make)


def clear(model) -> None:
    """Drop the decoders (KV buffers, graphs) and vision-tower graphs kept on ``model``; fused
    projections (``fuse.StepOptions.fuse``) get their own storage back."""
    unfuse(model)
    model.__dict__.pop(STORE, None)
    model.__dict__.pop(PLACED, None)
    vision_graph.clear(model)
