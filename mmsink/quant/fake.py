"""Fake quantization of a tower's linear layers: symmetric round-to-nearest, weights per output channel,
activations (each linear's input) per tensor (dynamic MinMax per image: one scale per image or tile, so a
batch gives each image what it gets alone) or per token. The values are rounded to the integer grid and
scaled back in float: the arithmetic an int8 kernel would see, without one."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from mmsink.core.bind import Bound

SETTINGS = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a8": (4, 8), "w4a4": (4, 4)}
GRANULARITY = ("per_tensor", "per_token")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = 8
    act_bits: int = 8
    act: str = "per_tensor"  # per_tensor: one scale per image (or tile); per_token: one per token

    def __post_init__(self):
        for bits in (self.weight_bits, self.act_bits):
            if not isinstance(bits, int) or not 2 <= bits <= 16:
                raise ValueError(f"mmsink: quantization bits must be integers in 2..16, got {bits!r}")
        if self.act not in GRANULARITY:
            raise ValueError(f"mmsink: quant act must be one of {GRANULARITY}, got {self.act!r}")


def make_config(value) -> QuantConfig | None:
    if value is None or value is False:
        return None
    if isinstance(value, QuantConfig):
        return value
    if isinstance(value, str) and value.lower() in SETTINGS:
        w, a = SETTINGS[value.lower()]
        return QuantConfig(w, a)
    if isinstance(value, dict):
        value = dict(value)
        bits = value.pop("bits", None)
        if bits is not None:
            if str(bits).lower() not in SETTINGS:
                raise ValueError(f"mmsink: quant bits must be one of {sorted(SETTINGS)}, got {bits!r}")
            value.setdefault("weight_bits", SETTINGS[bits.lower()][0])
            value.setdefault("act_bits", SETTINGS[bits.lower()][1])
        return QuantConfig(**value)
    raise ValueError(f"mmsink: quant_vision must be one of {sorted(SETTINGS)}, a dict or None, not {value!r}")


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize(x: torch.Tensor, amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` to the symmetric grid of ``bits`` whose largest level is ``amax`` (broadcast)."""
    q = qmax(bits)
    scale = amax.clamp_min(1e-12) / q
    return (x / scale).round().clamp(-q, q) * scale


def wide(x: torch.Tensor) -> torch.Tensor:
    """Half types are rounded in float32; float32 / float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    wf = wide(w)
    return quantize(wf, wf.abs().amax(1, keepdim=True), bits).to(w.dtype)


def quant_act(x: torch.Tensor, bits: int, act: str, images: torch.Tensor | None) -> torch.Tensor:
    """``x`` [B, N, D] (one image / tile per row) or [T, D] with ``images`` [T] the image of each row."""
    xf = wide(x)
    mag = xf.abs()
    if act == "per_token":
        amax = mag.amax(-1, keepdim=True)
    elif xf.dim() >= 3:
        amax = mag.flatten(1).amax(1).view(-1, *[1] * (xf.dim() - 1))
    elif images is not None and images.numel() == xf.shape[0]:
        rows = mag.amax(1)
        seg = rows.new_zeros(int(images.max()) + 1).scatter_reduce(0, images, rows, "amax")
        amax = seg[images][:, None]
    else:
        amax = mag.amax()
    return quantize(xf, amax, bits).to(x.dtype)


def bind_linear(linear: torch.nn.Linear, cfg: QuantConfig, state: dict, enabled) -> Bound:
    """``linear.forward`` on the fake-quantized weight (computed once) and input; ``state["images"]``: the
    image of each row for packed [T, D] inputs; ``enabled()`` False: the layer's own forward."""
    wq = quant_weight(linear.weight.detach(), cfg.weight_bits)

    def make(previous):
        def forward(self, x):
            if not enabled():
                return previous(x)
            xq = quant_act(x, cfg.act_bits, cfg.act, state.get("images"))
            return F.linear(xq, wq.to(x.device), self.bias)

        return forward

    return Bound(linear, "forward", make)
