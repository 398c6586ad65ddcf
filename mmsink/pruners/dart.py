"""DART (Wen et al., EMNLP 2025), as its official code selects (ZichenWen1/DART,
``llava/model/language_model/modeling_llama_self.py``, ``DART.get_retained_image_token``).

Before layer K (after layer K-1): pivots are the ``image_pivots`` (4) image tokens and the
``text_pivots`` (4) text tokens after the image with the largest L1 norm of layer K-1's post-RoPE keys
(all heads concatenated); similarity is the cosine between the final RMSNorm (``model.norm``) of layer
K-1's output states. The pivots are taken in the iteration order of the Python set the official code
builds from their sequence indices (``set(image_indices + query_indices)``; reproduced exactly on the
device, see ``set_order``); each in turn takes the ``per_pivot`` remaining image tokens least similar
to it (the image pivots are never candidates); the text pivots are then dropped. The image keeps its
image pivots and every token taken.

Budget mapping (per image): an int ``budget`` is the official ``--max_num_trunction B`` (LLaVA-1.5
scripts: 128; LLaVA-NeXT: ``retain_token_num_for_llava_next``, 320), each pivot taking
``math.ceil(B // 8)`` = B // 8 tokens; a float f is the official ``1 - reduction_ratio`` (the Qwen2-VL
code, and LLaVA's when no max_num_trunction is given), each pivot taking int(N * f / 8) = int(N * f) // 8.
So ``budget=128`` on a 576-token image is the paper's "128" setting: the 4 image pivots + 8 * 16 = 132
tokens kept. B is capped at N - image_pivots (the official NeXT cap) so the pools never run dry.

Beyond the official code (it takes one image a prompt, batch size 1): each image of a prompt gets its own
pivots and pool (``budget_per="prompt"``: the prompt's images are one image), its text pivots are taken
from the prompt's text after it, and when fewer than ``text_pivots`` text tokens follow it (the official
code would fail) the rest come from the prompt's other text tokens. Ties are broken towards the lower
position (the official topk's order on ties is unspecified)."""

from __future__ import annotations

import dataclasses

import torch

from ..core.graphs import Graphed
from .base import Pruner, budget_sizes, check_size, register

PERTURB_SHIFT = 5  # CPython's set table (Objects/setobject.c)
LINEAR_PROBES = 9
SET_MINSIZE = 8


@register
class DART(Pruner):
    name = "dart"
    default_budget = 128 / 576  # B = 128 on a 576-token image

    def final_layer(self, ctx):
        return self.options.k  # the one decision is applied here

    @dataclasses.dataclass
    class Options:
        k: int = 2
        image_pivots: int = 4
        text_pivots: int = 4

    def check_options(self):
        o = self.options
        if o.k < 1 or o.image_pivots < 1 or o.text_pivots < 0:
            raise ValueError("mmsink: dart needs k >= 1, image_pivots >= 1 and text_pivots >= 0")
        self.decide = Graphed(decide)  # one CUDA graph per input signature, eager off CUDA

    def check_model(self, num_layers):
        if self.options.k >= num_layers:
            raise ValueError(f"mmsink: dart k={self.options.k} must be < the model's {num_layers} layers")

    def directive(self, ctx, layer):
        return {"observe": True} if layer == self.options.k - 1 else None

    def per_pivot(self, n: int) -> int:
        """Tokens each pivot takes from an image of ``n`` tokens (host ints): B // pivots, B the int budget
        or int(n * f) for a float f (the official int(n * (1 - reduction_ratio) / 8))."""
        o = self.options
        b = self.budget if isinstance(self.budget, int) else int(n * self.budget)
        b = min(b, n - min(o.image_pivots, n))
        return b // (o.image_pivots + o.text_pivots)

    def kept(self, n: int, text: int) -> int:
        """Tokens an image of ``n`` tokens keeps, with ``text`` text tokens in the prompt."""
        o = self.options
        ip = min(o.image_pivots, n)
        return ip + (ip + min(o.text_pivots, text)) * self.per_pivot(n)

    def after_layer(self, ctx, layer, hidden, observed):
        if layer != self.options.k - 1:
            return
        o = self.options
        seg, lay, dev = ctx.seg, ctx.layout, ctx.device
        sizes = budget_sizes(ctx)
        check_size(self.budget, [n for s in sizes for n in s])
        # the keys' rotation is undone where positions may not start at 0 on each sample (see local_l1)
        pe = None if ctx.local_positions else tuple(t.to(dev) for t in ctx.current_position_embeddings())
        state = ctx.lm.norm(hidden.to(ctx.lm.norm.weight.device)).to(dev)  # the model's final norm
        vis, img, prompt = ctx.visual(), ctx.image_of(), ctx.in_prompt()
        pads = [lay.length - m for m in lay.lengths]
        n_text = [a - q + 1 - p for a, q, p in zip(lay.anchors, pads, lay.prompt_images)]  # prompt text
        images = max((len(s) for s in sizes), default=0)
        # everything from the layer's keys and states to the keep mask in one graph (``decide``)
        keep = self.decide(
            observed["k"].to(dev),
            pe,
            ctx.lm.rope if pe is not None else None,
            state,
            vis,
            img,
            prompt,
            seg.valid,
            seg.idx,
            lay.valid.to(dev),
            lay.counts.to(dev),
            (self.budget, o.image_pivots, o.text_pivots, ctx.budget_per == "prompt", images, lay.length),
        )
        b, n = seg.valid.shape
        d = state.shape[-1]
        pivots = min(o.image_pivots, n) + min(o.text_pivots, n)  # what ``ranked`` gives per pivot kind
        for m in range(images):
            ctx.add_flops(2 * b * n * pivots * d, pivot_work(ctx, o, sizes, m, d))
        counts = None
        if seg.counts is not None and ctx.protected is None and ctx.pending is None:
            counts = []
            for s, (t, _), nt in zip(lay.sizes, seg.counts, n_text):
                groups = [sum(s)] if ctx.budget_per == "prompt" and s else list(s)
                kept_n = [self.kept(g, nt) for g in groups]
                counts.append((t, kept_n))
        ctx.decide(keep, counts=counts)


def decide(k, pe, rope, state, vis, img, prompt, valid, idx, lay_valid, counts, plan):
    """The keep mask [B, n] over the current slots (every real text slot, the chosen image tokens) from
    layer K-1's post-RoPE keys ``k`` [B, Hkv, n, d] and final-normed states ``state`` [B, n, D]: the keys'
    L1 norms at each sample's own positions (``local_l1``; ``pe`` the slots' rotary (cos, sin) and
    ``rope`` the model's rotary function, or None where positions start at 0 on each sample), the
    official code's indices from the layout's ``lay_valid`` [B, L] and the slots' positions ``idx``,
    each image's per-pivot counts from its size in ``counts`` [B, M]. ``plan``: (budget, image pivots,
    text pivots, one budget per prompt, images, the layout's length). Tensors in and out, no host read:
    ``Graphed`` replays it as one CUDA graph."""
    budget, image_pivots, text_pivots, per_prompt, images, length = plan
    knorm = local_l1(k, valid, pe, rope)  # [B, n]
    state = torch.nn.functional.normalize(state.float(), dim=-1)
    if per_prompt:
        img = torch.where(img >= 0, torch.zeros_like(img), img)
        counts = counts.sum(1, keepdim=True)
    # the official code's indices: the padding counted on the device
    pos = idx + (lay_valid.sum(1, keepdim=True) - length)
    per = per_pivot_of(counts, budget, image_pivots + text_pivots, image_pivots)  # [B, M]
    kept = choose(knorm, state, img, prompt & ~vis, pos, per, images, image_pivots, text_pivots, length)
    return torch.where(vis, kept, valid)  # ``Prefill.keep_text``: visual slots are real ones


def per_pivot_of(n: torch.Tensor, budget, pivots: int, image_pivots: int) -> torch.Tensor:
    """Tokens each of ``pivots`` pivots takes from images of ``n`` tokens (long, on the device; 0 for a
    size of 0): B // pivots, B the int ``budget`` or int(n * f) for a float f, capped at n minus the
    image pivots."""
    cap = n - n.clamp(max=image_pivots)
    if isinstance(budget, int):
        b = cap.clamp(max=budget)
    else:  # int(n * f): the double product, truncated (n * f >= 0)
        b = torch.minimum((n.double() * budget).floor().long(), cap)
    return b // pivots


def choose(knorm, state, img, text, pos, per, images: int, image_pivots: int, text_pivots: int, max_pos: int):
    """The kept image tokens [B, n] (bool): each image's pivots and the tokens they take. ``knorm`` [B, n]
    the keys' L1 norms, ``state`` [B, n, D] the normalised states, ``img`` [B, n] each slot's image (-1:
    none), ``text`` [B, n] the prompt's text slots, ``pos`` [B, n] the official code's indices (below
    ``max_pos``), ``per`` [B, M] tokens each pivot of image m takes. Tensors in and out, no host read:
    ``Graphed`` replays it as one CUDA graph."""
    b, n = knorm.shape
    slot = torch.arange(n, device=knorm.device).expand(b, n)
    kept = torch.zeros_like(text)
    for m in range(images):
        cand = img == m
        first = torch.where(cand, slot, n).amin(1)  # the image's first slot (n when absent)
        # pivots: image tokens, then text after the image (other prompt text fills a shortfall)
        ip = ranked(knorm, cand, image_pivots)
        tp = ranked(knorm, text, text_pivots, first=text & (slot > first[:, None]))
        piv = torch.cat([ip, tp], 1)  # [B, P] slots, -1 where absent
        at = piv.clamp(min=0)
        order = set_order(pos.gather(1, at), piv >= 0, max_pos)  # [B, P] columns, -1 absent
        hp = state.gather(1, at[..., None].expand(-1, -1, state.shape[-1]))
        sim = torch.einsum("bnd,bpd->bpn", state, hp)  # [B, P, n]
        # the image minus its pivots (a -1 pivot, clamped to slot 0, only where all its tokens are pivots)
        pool = cand.scatter(1, at[:, : ip.shape[1]], False)
        # each pivot's slots by (similarity, slot), sorted once, in visiting order: a pivot in turn takes
        # the first k of its list still in the pool (the pool only shrinks, so the order among what is
        # left is the one a sort of the pool alone would give)
        ranked_slots = torch.where(cand[:, None], sim, float("inf")).argsort(dim=2, stable=True)
        ranked_slots = ranked_slots.gather(1, order.clamp(min=0)[..., None].expand(-1, -1, n))
        ks = torch.where(order >= 0, per[:, m : m + 1], 0)  # [B, P] tokens each visit takes
        for t in range(order.shape[1]):
            s = ranked_slots[:, t]
            inside = pool.gather(1, s)
            pool.scatter_(1, s, inside & (inside.cumsum(1) > ks[:, t : t + 1]))  # the first k leave
        kept |= cand ^ pool  # the image pivots and every token taken (the pool is within the image)
    return kept


def local_l1(k: torch.Tensor, valid: torch.Tensor, pe, rope) -> torch.Tensor:
    """[B, n] the L1 norms (all heads) of the post-RoPE keys ``k`` [B, Hkv, n, d] at each sample's own
    positions (its first token at 0, as the official batch-1 code sees them): a left-padded forward without
    position ids rotates a sample's keys by its padding too, which changes their L1 norm (RoPE keeps only
    the L2 norm). Undone by the inverse of the first real token's rotation, from the slots' (cos, sin)
    ``pe`` [B, n, d] and the model's ``rope``; ``pe`` None: positions start at 0 (the rotation is the
    identity and is skipped)."""
    kf = k.float()
    if pe is not None:
        cos, sin = pe
        first = valid.long().argmax(1)  # the first real token: text, never dropped
        idx = first[:, None, None].expand(-1, 1, cos.shape[-1])
        c0, s0 = cos.gather(1, idx).float(), sin.gather(1, idx).float()
        norm = c0.pow(2) + s0.pow(2)  # the rotary's attention scaling, squared (1 for plain RoPE)
        # rotated alone: the rotary's query argument is a one-slot stand-in it broadcasts over
        kf = rope(kf[:, :1, :1], kf, c0 / norm, -s0 / norm)[1]
    return kf.abs().sum((1, 3))


def pivot_work(ctx, o, sizes: list, m: int, d: int):
    """[B] the FLOPs of image ``m``'s similarities as each sample would run them alone: only a sample that
    has that image, over its own slots and pivots (``ranked`` gives at most a slot per pivot)."""
    real = ctx.real_tokens()
    has = [m < len(s) for s in sizes]
    if torch.is_tensor(real):
        piv = real.clamp(max=o.image_pivots) + real.clamp(max=o.text_pivots)
        return 2 * real * piv * d * torch.tensor(has, device=real.device)
    return [2 * r * (min(o.image_pivots, r) + min(o.text_pivots, r)) * d * h for r, h in zip(real, has)]


def ranked(score: torch.Tensor, cand: torch.Tensor, k: int, first=None) -> torch.Tensor:
    """[B, k] slots of the k highest ``score`` among ``cand`` (descending; ties: lower slot first), -1
    where a sample has fewer candidates. ``first`` [B, n] bool, within ``cand``: those rank before the
    others."""
    order = torch.where(cand, score.float(), float("-inf")).argsort(dim=1, descending=True, stable=True)
    if first is not None:
        lead = first.gather(1, order).long()
        order = order.gather(1, lead.argsort(dim=1, descending=True, stable=True))
    order = order[:, :k]
    return torch.where(cand.gather(1, order), order, -1)


# ---------------------------------------------------------------- CPython's set iteration order, batched


def set_order(values: torch.Tensor, valid: torch.Tensor, max_value: int) -> torch.Tensor:
    """The order in which CPython iterates ``set(v for v, ok in zip(row, valid_row) if ok)`` for each row of
    ``values`` [G, P] (distinct non-negative ints below ``max_value``), as column indices [G, P] (-1 past
    the row's elements). No host read: the set's table (8 slots, grown to 32 at the fifth insertion, the
    old table's slots re-inserted in order; linear probes, then perturbed jumps) is filled on the device
    along probe sequences long enough to always reach a free slot (bounded from ``max_value``). P <= 8."""
    g, p = values.shape
    if p > 8:
        raise ValueError("mmsink: set_order covers up to 8 elements (a set grown once)")
    dev = values.device
    col = torch.arange(p, device=dev).expand(g, p)
    cols = torch.where(valid, col, p).sort(dim=1).values  # valid columns first, in order
    good = cols < p
    cols = cols.clamp(max=p - 1)
    h = values.gather(1, cols).long()
    shifts = -(-max(int(max_value).bit_length(), 1) // PERTURB_SHIFT)  # jumps while perturb is non-zero
    # once perturb is 0 the jumps cycle through every slot: <= 4 taken of 8, <= 7 of 32 (a window of 10
    # linear probes always has a free slot) bound the probes
    start = jumps(h, shifts + 8)  # [G, P, S] modulo 32
    # each table has one more column: the elements a row lacks are written there. 8 slots: no linear
    # probes (i + LINEAR_PROBES > 7), the starts modulo 8
    p8 = torch.where(good[..., None], start[..., : shifts + 5] & (SET_MINSIZE - 1), SET_MINSIZE)
    t8 = torch.full((g, SET_MINSIZE + 1), -1, dtype=torch.long, device=dev)
    for j in range(min(p, 5)):
        insert(t8, p8[:, j], j)
    pos = listed(t8[:, :SET_MINSIZE], p)  # positions in the compacted row
    if p >= 5:  # 5 elements * 4 -> above 20: 32 slots
        s32 = torch.where(good[..., None], start, 32)
        ar = torch.arange(LINEAR_PROBES + 1, device=dev)
        near = (s32 <= 31 - LINEAR_PROBES)[..., None]  # the next LINEAR_PROBES slots fit
        p32 = torch.where(near, s32[..., None] + ar, s32[..., None]).flatten(-2)
        t32 = torch.full((g, 33), -1, dtype=torch.long, device=dev)
        # the resize re-inserts in the old table's slot order (rows with fewer than 5 elements keep pos)
        old = pos[:, :5]
        moved = p32.gather(1, old.clamp(min=0)[..., None].expand(-1, -1, p32.shape[2]))
        for r in range(5):
            insert(t32, moved[:, r], old[:, r])
        for j in range(5, p):
            insert(t32, p32[:, j], j)
        pos = torch.where(good[:, 4:5], listed(t32[:, :32], p), pos)
    return torch.where(pos >= 0, cols.gather(1, pos.clamp(min=0)), -1)


def jumps(h: torch.Tensor, steps: int) -> torch.Tensor:
    """[..., steps] where each of CPython's probe runs starts, for hashes ``h`` [...] in a 32-slot table:
    i = 5i + 1 + perturb, perturb shifted right by 5 before each jump. In closed form (the table's size is
    a power of two, so the recurrence holds modulo it): i_s = 5^s i_0 + sum_{1 <= r <= s} 5^(s-r)
    (1 + (h >> 5r)), every start in a few ops instead of a loop of them. Modulo 8 (which divides 32):
    the 8-slot table's starts. (Its constants are made on each call, no cache kept: on a GPU they are
    kernels of ``decide``'s graph.)"""
    s = torch.arange(steps, device=h.device)
    e = s[:, None] - s[None, :]  # [S, R]: the power of 5 that term r carries at start s
    coef = torch.where(e >= 0, torch.pow(5, e.clamp(min=0)), 0) & 31
    shift, one = s * PERTURB_SHIFT, (s > 0).long()  # term 0: i_0 = h, no 1 added
    terms = ((h[..., None] >> shift) + one) & 31  # [..., R]: i_0, then 1 + perturb_r
    return (terms[..., None, :] * coef).sum(-1) & 31


def insert(table: torch.Tensor, slots: torch.Tensor, element) -> None:
    """Put ``element`` (int or [G]) into the first empty slot (-1) of each row's probe list ``slots``."""
    at = slots.gather(1, table.gather(1, slots).argmin(1, keepdim=True))  # argmin: the first -1
    # an int is filled on the device: as_tensor(int) would be a host-to-device copy
    table.scatter_(1, at, element if isinstance(element, int) else element[:, None])


def listed(table: torch.Tensor, p: int) -> torch.Tensor:
    """[G, p] the table's elements in slot order, -1 padded (p <= the table's slots)."""
    return table.gather(1, (table < 0).to(torch.uint8).argsort(dim=1, stable=True)[:, :p])
