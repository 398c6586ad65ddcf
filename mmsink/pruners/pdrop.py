"""PyramidDrop (Xing et al., CVPR 2025), as its official code selects (Cooperx521/PyramidDrop,
``llava/model/modeling_llama_pdrop.py``, ``pdrop_rank_drop``).

At the end of each stage (default layers L/4, L/2, 3L/4: the model runs ``layers[0]`` layers on every
token, then drops) the tokens are ranked by the layer that comes NEXT: its own ``input_layernorm`` and
q/k projections, with RoPE, applied to the hidden states entering it. One query row, the prompt's last
token (the official "last instruction token"); causal softmax over the prompt; mean over heads; the
image's span. Stage s keeps ``int(N * lambda**s)`` of the image's ORIGINAL N tokens (the official
``image_token_ratio_list``, [1, lambda, lambda**2, lambda**3]).

Knowing differences from the official code: positions. The official code re-indexes position ids to
0..n-1 after each drop, so a later stage scores (and every later layer runs) with shifted rotary
positions; mmsink keeps every token's original position (a global choice, see the README), so stages
after the first rank with the original positions. The first stage is the official selection exactly.
Several images a prompt (the official code handles one): each image keeps int(N_m * lambda**s) of its
own N_m (``budget_per="prompt"``: of the prompt's images together). Grouped-query attention (the official
code is written for Llama-2's full heads): keys are shared by their group's query heads, as the layer
does. The scoring uses the layer's plain softmax (a VAR edit at that layer is not applied to the ranking).

Budget convention (the FLOPs-matched one of the PDrop paper): the average number of visual tokens per
layer. The schedule keeps the stage layers (scaled to the model's depth) and solves lambda; when even a
small lambda cannot reach the budget, the stages move earlier (layers scaled by 0.75, 0.5, ...). No budget:
the official setting, ``layers=(8, 16, 24)`` of 32 (scaled) and ``ratio=0.5`` (lambda). To run exactly an
official configuration give ``layers`` and ``ratio`` and no budget: ``--layer_list [8,16,24]
--image_token_ratio_list [0.5,0.25,0.125]`` is ``layers=(8, 16, 24), ratio=0.5``.

A stage's ranking past the model's own modules (RoPE, the anchor row's softmax, each image's top-k:
``rank_and_pick``) replays on a GPU as one CUDA graph per input signature (``core.graphs.Graphed``)."""

from __future__ import annotations

import dataclasses

import torch

from ..core.graphs import Graphed
from ..core.plan import layer_device
from .base import (
    Pruner,
    anchor_softmax,
    budget_fraction,
    image_candidates,
    pick_per_image,
    register,
    topk_counts,
)

SCALES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)
MIN_RATIO = 0.25


def default_layers(num_layers: int, scale: float = 1.0) -> tuple[int, ...]:
    out = []
    for i in (1, 2, 3):
        s = max(1, round(scale * num_layers * i / 4))
        s = max(s, out[-1] + 1) if out else s
        out.append(min(s, num_layers - 1))
    if len(set(out)) < 3:
        raise ValueError(f"mmsink: pdrop needs at least 4 decoder layers, the model has {num_layers}")
    return tuple(out)


def mean_fraction(layers, ratio, num_layers) -> float:
    edges = (0, *layers, num_layers)
    return sum((edges[i + 1] - edges[i]) * ratio**i for i in range(4)) / num_layers


def solve_ratio(layers, target, num_layers) -> float | None:
    if not (mean_fraction(layers, 0.0, num_layers) <= target <= 1.0):
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_fraction(layers, mid, num_layers) < target else (lo, mid)
    return (lo + hi) / 2


def schedule(num_layers: int, fraction: float | None, layers=None, ratio=0.5):
    if fraction is None:
        return tuple(layers or default_layers(num_layers)), ratio
    candidates = [tuple(layers)] if layers else [default_layers(num_layers, s) for s in SCALES]
    found = None
    for cand in candidates:
        lam = solve_ratio(cand, fraction, num_layers)
        if lam is not None:
            found = (cand, lam)
            if lam >= MIN_RATIO:
                break
    if found is None:
        raise ValueError(f"mmsink: pdrop cannot reach an average of {fraction:.3f} of the visual tokens")
    return found


def stage_keep(n: int, ratio: float, stage: int) -> int:
    """Tokens an image of ``n`` original tokens keeps after stage ``stage`` (1-based): the official
    ``int(n * ratio_list[stage])`` with ratio_list[s] = ratio ** s."""
    return int(n * ratio**stage)


@register
class PDrop(Pruner):
    name = "pdrop"

    def final_layer(self, ctx):
        return max(ctx.run["layers"], default=0)  # the last stage

    def report(self, ctx):
        return {"schedule": {"layers": list(ctx.run["layers"]), "ratio": ctx.run["ratio"]}}

    @dataclasses.dataclass
    class Options:
        layers: tuple | None = None
        ratio: float = 0.5

    def check_options(self):
        if not 0.0 < self.options.ratio < 1.0:
            raise ValueError("mmsink: pdrop ratio must lie in (0, 1)")
        if self.options.layers is not None:
            ls = tuple(self.options.layers)
            if len(ls) != 3 or list(ls) != sorted(set(ls)) or ls[0] < 1:
                raise ValueError("mmsink: pdrop layers must be three increasing layer indices >= 1")
        # one CUDA graph per (input shape, stage) on a GPU, eager off CUDA; three stages of two shapes kept
        self.rank = Graphed(rank_and_pick, keep=6)

    def check_model(self, num_layers):
        if self.options.layers is not None and max(self.options.layers) >= num_layers:
            raise ValueError(
                f"mmsink: pdrop layers {self.options.layers} exceed the model's {num_layers} layers"
            )
        default_layers(num_layers)

    def start(self, ctx):
        n_img = max((n for row in ctx.layout.sizes for n in row), default=0)  # host ints: no sync
        frac = None if self.budget is None else budget_fraction(self.budget, max(n_img, 1))
        layers, ratio = schedule(ctx.num_layers, frac, self.options.layers, self.options.ratio)
        ctx.run = {"layers": layers, "ratio": ratio}

    def after_layer(self, ctx, layer, hidden, observed):
        layers = ctx.run["layers"]
        if layer + 1 not in layers:
            return
        stage = layers.index(layer + 1) + 1
        frac = ctx.run["ratio"] ** stage  # the same float64 product on the host and the device

        def k_host(orig: int, cur: int) -> int:
            return int(orig * frac)

        chosen = next_layer_choice(ctx, layer + 1, hidden, frac, self.rank)
        ctx.decide(ctx.keep_text(chosen), counts=topk_counts(ctx, k_host))


def next_layer_choice(ctx, layer: int, hidden: torch.Tensor, frac: float, rank=None) -> torch.Tensor:
    """The kept visual slots [B, n]: each image's ``int(N * frac)`` best by the anchor row's attention at
    ``layer``, from that layer's own input_layernorm, q/k projections and RoPE applied to ``hidden`` (the
    states entering it). Only the anchor's query row is projected; every slot's key is (the official code
    projects every query row). The model's modules run here; the rest is ``rank_and_pick`` (``rank``: it
    or a ``Graphed`` of it)."""
    block = ctx.lm.layers[layer]
    attn = block.self_attn
    dev = layer_device(block)  # where the layer computes (accelerate-offloaded weights sit on meta)
    x = block.input_layernorm(hidden.to(dev))
    b, n, dm = x.shape
    hd = attn.head_dim
    anchor = ctx.anchor_slot().to(dev)
    xa = x.gather(1, anchor[:, None, None].expand(-1, 1, dm))  # [B, 1, D]
    q = attn.q_proj(xa).view(b, 1, -1, hd).transpose(1, 2)  # [B, H, 1, d]
    k = attn.k_proj(x).view(b, n, -1, hd).transpose(1, 2)  # [B, Hkv, n, d]
    cos, sin = (t.to(dev) for t in ctx.current_position_embeddings())
    h, hkv = q.shape[1], k.shape[1]

    def cost(rows, slots):  # the anchor's query, every slot's key, the logits
        return 2 * rows * dm * h * hd + 2 * slots * (dm * hkv * hd + h * hd)

    real = ctx.real_tokens()  # a sample alone runs on its own slots only
    ctx.add_flops(cost(b, b * n), cost(1, real) if torch.is_tensor(real) else [cost(1, m) for m in real])
    img, orig = ctx.image_of().to(dev), ctx.layout.counts.to(dev)
    args = (q, k, cos, sin, anchor, ctx.in_prompt().to(dev), img, orig)
    plain = (ctx.lm.rope, attn.scaling, frac, ctx.budget_per == "prompt")
    return (rank or rank_and_pick)(*args, *plain).to(ctx.device)


def rank_and_pick(q, k, cos, sin, anchor, prompt, img, orig, rope, scaling: float, frac: float, joint: bool):
    """The kept visual slots [B, n] (bool). ``q`` [B, H, 1, d] the anchor's query and ``k`` [B, Hkv, n, d]
    every slot's key, before ``rope`` (the family's rotary function) with the rows ``cos``, ``sin`` [B, n, d];
    ``anchor`` [B] its slot, ``prompt`` [B, n] the slots up to it, ``img`` [B, n] each slot's image (-1:
    none), ``orig`` [B, M] each image's original size; image m keeps ``int(orig * frac)`` of its slots
    (``joint``: a prompt's images compete as one). The anchor row's causal softmax, mean over heads,
    ranks them. Tensors in and out, no host read: ``Graphed`` replays it as one CUDA graph."""
    idx = anchor[:, None, None].expand(-1, 1, cos.shape[-1])
    # the rotary's other argument is a one-slot stand-in (its output is dropped): not a second full rotation
    q = rope(q, q[:, :1], cos.gather(1, idx), sin.gather(1, idx))[0]
    k = rope(k[:, :1, :1], k, cos, sin)[1]
    # upcast before the product: PDrop's logits are an fp32 product (anchor_softmax multiplies in its
    # inputs' dtype)
    score = anchor_softmax(q[:, :, 0].float(), k.float(), prompt, scaling).mean(1)
    # k: truncation, as the host's int()
    images = image_candidates(img, orig, lambda n, cur: (n.double() * frac).long(), joint)
    return pick_per_image(score, images, img)
