"""``wrap(model, kv={...})``: the settings of the sink + window / quantized KV cache, checked once."""

from __future__ import annotations

from dataclasses import dataclass, field

# rope types whose frequencies do not depend on the sequence length: a rotation by a delta is exact
FIXED_ROPE = ("default", "linear", "llama3", "yarn")


BITS = {"int2": 2, "int4": 4, "int8": 8, "int16": 16}


@dataclass
class KVConfig:
    window: int | None = None  # the most recent tokens kept per sample (they include the newest ones)
    # the first tokens kept (the paper's sinks; default 4), or "auto": ``first`` + detected ones. With
    # sparse: an int N (default 0), each sample's first N real slots always chosen, counted inside topk
    # (mmsink's addition, not LFPS's rule)
    sinks: int | str | None = None
    first: int = 4  # with "auto": the first tokens kept besides the detected sinks
    sink_dims: tuple | None = None  # massive-activation channels ("auto"; from ``mmsink calibrate``)
    tau: float = 20.0  # a token is a sink when max_d |x_d| / RMS(x) > tau (VAR's detector)
    sink_layer: int = 2  # the decoder layer whose input state is scored
    quant: str | None = None  # KVSink-style fake quantization: "int2" / "int4" / "int8" / "int16"
    group_size: int = 32  # tokens per key scale (per channel), channels per value scale (per token)
    keep_sinks: bool = True  # quant: sinks stay in full precision and out of the scales
    sparse: str | None = None  # "lfps": sparse decode attention (mmsink.kv.sparse)
    topk: int = 512  # lfps: keys attended per query head and step
    dense_steps: int = 2  # lfps: dense decode steps after each prompt / turn (they seed the history)
    expand: int = 1  # lfps: candidates widened by +-expand slots
    auto: bool = field(init=False, default=False)
    bits: int = field(init=False, default=16)

    def __post_init__(self):
        if self.sinks is None:
            self.sinks = 0 if self.sparse is not None else 4
        if self.sparse is not None:
            self.check_sparse()
        elif self.quant is not None:
            self.check_quant()
        elif isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"mmsink: kv window must be an int >= 1, got {self.window!r}")
        self.auto = self.sinks == "auto"
        if not self.auto:
            if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
                raise ValueError(f"mmsink: kv sinks must be an int >= 0 or 'auto', got {self.sinks!r}")
            self.first = self.sinks
        elif self.sink_dims is None:
            raise ValueError(
                "mmsink: kv sinks='auto' needs sink_dims (the model's massive-activation channels, as "
                "`mmsink calibrate` writes them, e.g. (1415, 2533) for LLaMA-2-7B / LLaVA-1.5-7B)"
            )
        if isinstance(self.first, bool) or not isinstance(self.first, int) or self.first < 0:
            raise ValueError(f"mmsink: kv first must be an int >= 0, got {self.first!r}")
        if self.sink_dims is not None:
            try:
                self.sink_dims = tuple(int(d) for d in self.sink_dims)
            except (TypeError, ValueError):
                bad = self.sink_dims
                raise ValueError(f"mmsink: kv sink_dims must be channel indices, got {bad!r}") from None
            if not self.sink_dims or min(self.sink_dims) < 0:
                raise ValueError("mmsink: kv sink_dims must be a non-empty list of channel indices >= 0")
        if not isinstance(self.tau, (int, float)) or not self.tau > 0:
            raise ValueError(f"mmsink: kv tau must be > 0, got {self.tau!r}")
        if isinstance(self.sink_layer, bool) or not isinstance(self.sink_layer, int) or self.sink_layer < 0:
            raise ValueError(f"mmsink: kv sink_layer must be an int >= 0, got {self.sink_layer!r}")

    def check_sparse(self) -> None:
        if self.sparse != "lfps":
            raise ValueError(f"mmsink: kv sparse must be 'lfps', got {self.sparse!r}")
        if self.window is not None or self.quant is not None:
            raise ValueError("mmsink: kv sparse does not combine with window / quant yet (choose one)")
        for name, low in (("topk", 1), ("dense_steps", 1), ("expand", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"mmsink: kv {name} must be an int >= {low}, got {v!r}")
        s = self.sinks
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < self.topk:
            top = self.topk - 1
            raise ValueError(f"mmsink: kv sparse sinks must be an int in 0 .. topk - 1 ({top}), got {s!r}")

    def check_quant(self) -> None:
        if self.window is not None:
            raise ValueError("mmsink: kv window and quant do not combine yet (choose one)")
        if self.quant not in BITS:
            raise ValueError(f"mmsink: kv quant must be one of {sorted(BITS)}, got {self.quant!r}")
        self.bits = BITS[self.quant]
        if self.bits in (2, 4) and not _has_quanto():
            raise ValueError(
                f"mmsink: kv quant {self.quant} stores packed codes through optimum-quanto: "
                "pip install 'optimum-quanto>=0.2.5' (or mmsink[kv])"
            )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"mmsink: kv group_size must be an int >= 2, got {self.group_size!r}")
        if not isinstance(self.keep_sinks, bool):
            raise ValueError(f"mmsink: kv keep_sinks must be True or False, got {self.keep_sinks!r}")

    def new_cache(self, inv_freq, planned: bool = False):
        """The cache of a fresh forward; ``planned``: a pruned prefill (the plan's per-layer segments)."""
        from .planned import PlanQuantCache, PlanWindowCache
        from .quant import QuantCache
        from .sparse import PlanSparseCache, SparseCache
        from .window import WindowCache

        if self.sparse:
            return (PlanSparseCache if planned else SparseCache)(self, inv_freq)
        if planned:
            return (PlanQuantCache if self.quant else PlanWindowCache)(self, inv_freq)
        return (QuantCache if self.quant else WindowCache)(self, inv_freq)

    def check(self, handle) -> None:
        """Refuse what this cache cannot do right, in one line each."""
        fam = handle.family
        if handle.var is not None:
            raise ValueError(
                "mmsink: kv= does not combine with var= yet (VAR's per-layer key groups are not carried "
                "through evictions and quantization)"
            )
        if self.sparse is not None:
            self.check_auto(handle)
            return
        if self.quant is not None:
            if handle.sinks is not None:
                raise ValueError("mmsink: kv quant does not combine with sink_forward= yet")
            if getattr(handle.pruner, "name", "") == "orthorank":  # its selection layers write keys directly
                raise ValueError("mmsink: kv quant does not combine with prune='orthorank' yet")
            self.check_quant_model(handle)
            return
        rope = getattr(fam.language_model, "rotary_emb", None)
        if rope is None or getattr(rope, "rope_type", "default") not in FIXED_ROPE:
            raise ValueError(
                f"mmsink: kv= needs a rotary embedding with fixed frequencies ({', '.join(FIXED_ROPE)})"
            )
        text = fam.text_config
        if any(t != "full_attention" for t in (getattr(text, "layer_types", None) or [])):
            raise ValueError("mmsink: kv= supports full-attention layers only (this model has sliding ones)")
        self.check_auto(handle)

    def check_quant_model(self, handle) -> None:
        text = handle.family.text_config
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if head % min(self.group_size, head):
            raise ValueError(f"mmsink: kv group_size {self.group_size} does not divide the head size {head}")
        self.check_auto(handle)

    def check_auto(self, handle) -> None:
        if self.auto:
            text = handle.family.text_config
            if self.sink_layer >= handle.num_layers:
                raise ValueError(f"mmsink: kv sink_layer {self.sink_layer} >= the {handle.num_layers} layers")
            if max(self.sink_dims) >= text.hidden_size:
                raise ValueError(
                    f"mmsink: kv sink_dims {self.sink_dims} exceed the hidden size {text.hidden_size}"
                )

    def install(self, handle) -> list:
        from .hooks import install

        return install(self, handle)


def _has_quanto() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:
        return False


def make_config(kv) -> KVConfig | None:
    if kv is None or kv is False:
        return None
    if isinstance(kv, KVConfig):
        return kv
    if not isinstance(kv, dict):
        raise ValueError(f"mmsink: kv must be a dict such as {{'window': 1024, 'sinks': 4}}, got {kv!r}")
    known = {"window", "sinks", "first", "sink_dims", "tau", "sink_layer", "quant", "group_size"}
    known |= {"keep_sinks", "sparse", "topk", "dense_steps", "expand"}
    unknown = sorted(set(kv) - known)
    if unknown:
        raise ValueError(f"mmsink: unknown kv option(s) {unknown}; known: {sorted(known)}")
    if "window" not in kv and "quant" not in kv and "sparse" not in kv:
        raise ValueError("mmsink: kv needs a window (the number of recent tokens kept), quant or sparse")
    return KVConfig(**kv)
