"""CDPruner (Zhang et al., NeurIPS 2025; Theia-4869/CDPruner, ``llava/model/llava_arch.py``,
``encode_images``, and ``llava/model/multimodal_encoder/clip_encoder.py``): an instruction-conditioned DPP on
the visual tokens after the projector, before the LLM.

Official rule: similarity S = cosine of the projected visual tokens (normalised in the model's dtype,
then float32); relevance r = mean over the question's 77-token CLIP chunks of -cos(image embed, text
embed), min-max normalised as (r - min + 1e-6) / (max - min), where image embeds are the CLIP feature
layer's patch outputs through CLIP's post-layernorm and visual projection (float32) and text embeds the
CLIP text tower's projected [EOS] output; kernel diag(r) S diag(r); fast greedy MAP inference for exactly
T steps (argmax: ties to the first index); picks sorted.

How mmsink gets the parts llava-hf checkpoints lack (the CLIP text tower, tokenizer, visual projection):
``clip=`` a local CLIPModel directory (its CLIPTokenizerFast is loaded from it) or a ``CLIPModel`` instance
(then ``clip_tokenizer=`` a CLIP tokenizer, or it is loaded from the instance's ``name_or_path``). It is
moved to the model's device on first use (load it in float32: the official projections run in float32).
The question text is the prompt's text after the sample's last image up to its last prompt token,
decoded with ``tokenizer=`` (the LLM's tokenizer, instance or directory; special tokens skipped); it then
includes what the chat template puts there (e.g. "ASSISTANT:"). That costs one read of the prompt's ids.
The feature layer's outputs are taken at the projector's input; the post-layernorm is the model's own
vision tower's (unused by LLaVA, so CLIP's).

``relevance``: "clip" (the official rule; needs ``clip`` and ``tokenizer``), "embeds" (departure: the
same formula with the projected visual tokens against the LLM input embeddings of those question
tokens; no extra model), "none" (departure: r = 1, a plain DPP on S with its diagonal set to exactly 1,
question-independent), or "auto" (default): "clip" when ``clip`` is given, else "embeds". Qwen2-VL / 2.5-VL
have no CLIP tower (nor [CLS]): "clip" is refused there at the first prefill and "auto" means "embeds".
The projector's input reaches the pruner through its own forward pre-hook (``install``, called by the
handle's ``attach``); in NeXT it also says which tokens are newlines (the family's token map, on the host).

Budget: tokens kept per image (int) or a fraction of its candidates (ceil). LLaVA-NeXT: the official
code runs the DPP on each tile (T per tile, README: 32 * 5 = 320), normalises r over all tiles of the batch
and always keeps the newline tokens; mmsink runs one DPP per image over its tokens as they enter the LLM
(base tile and unpadded crops; r normalised per image) and keeps the newline tokens beyond the budget, as
the official code does. Several images: one DPP per image (``budget_per="prompt"``: per prompt; r then
normalised over the prompt's images). Departures also: r is normalised per image (the official code: over
the whole batch, i.e. the same for one image per prompt); once the kernel's rank is spent (T larger than
the feature dimension, where the official code divides by sqrt(<= 0) and yields NaN) the remaining picks
are still distinct tokens (the divisor is clamped at 1e-10); kept tokens keep their original positions.
All images of a batch run together (one kernel per image, padded to the largest; one loop over T steps,
on a GPU replayed as one CUDA graph per shape and T, ``core.graphs.Graphed``).
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.flops import linear_params
from ..core.graphs import Graphed
from ..core.plan import Prefill
from .base import Pruner, budget_count, budget_tokens, check_size, register
from .divprune import Groups

RELEVANCE = ("auto", "clip", "embeds", "none")


@register
class CDPruner(Pruner):
    name = "cdpruner"
    default_budget = 128 / 576

    @dataclasses.dataclass
    class Options:
        relevance: str = "auto"
        clip: object = None  # a local CLIPModel directory or a CLIPModel instance
        clip_tokenizer: object = None  # a CLIP tokenizer (default: loaded from ``clip``)
        tokenizer: object = None  # the LLM's tokenizer (instance or directory): question ids -> text

    def check_options(self):
        o = self.options
        if o.relevance not in RELEVANCE:
            raise ValueError(f"mmsink: cdpruner relevance must be one of {RELEVANCE}, got {o.relevance!r}")
        if o.relevance == "clip" and o.clip is None:
            raise ValueError(
                "mmsink: cdpruner relevance='clip' needs clip= (a CLIPModel directory or instance with the "
                "text tower and visual projection; llava-hf checkpoints lack them)"
            )
        if self.mode_for(True) == "clip" and o.tokenizer is None:
            raise ValueError("mmsink: cdpruner with clip= needs tokenizer= (the LLM's, to read the question)")
        self.family = None
        self.loaded = None  # (CLIPModel, CLIP tokenizer, LLM tokenizer) once loaded
        self.greedy = Graphed(dpp_greedy)  # one CUDA graph per (groups, width, steps) on a GPU

    def mode_for(self, has_clip_tower: bool) -> str:
        r = self.options.relevance
        if r == "auto":
            return "clip" if self.options.clip is not None and has_clip_tower else "embeds"
        return r

    def final_layer(self, ctx):
        return 0  # decided before the first layer

    def install(self, seam, family) -> list:
        """A hook on the projector's input: the vision feature layer's outputs of this prefill."""
        self.family = family

        def pre(module, args):
            ctx = seam.prefill()
            if ctx is not None and isinstance(ctx.run, dict):
                ctx.run["vision"] = args[0]

        return [family.projector.register_forward_pre_hook(pre)]

    def start(self, ctx):
        ctx.run = {}

    # ------------------------------------------------------------------ selection
    def before_llm(self, ctx: Prefill, embeds):
        vision = ctx.run.pop("vision", None)
        groups = Groups(ctx)
        if not groups.sizes:
            return None
        dev = embeds.device
        post_ln = clip_post_layernorm(self.family)
        mode = self.mode_for(post_ln is not None)
        if mode == "clip" and post_ln is None:
            raise ValueError(
                "mmsink: cdpruner relevance='clip' needs a CLIP vision tower (LLaVA-1.5 / -NeXT)"
            )
        # LLaVA-NeXT: per visual token its row in the projector input (-1: a newline token)
        src_host = None
        if hasattr(self.family, "token_map"):
            if vision is None:
                raise ValueError("mmsink: cdpruner did not see this prefill's projector input")
            src_host, _ = self.family.token_map(vision, ctx.kwargs, on_host=True)
        cand, newline, n_cand, n_dev = groups.real, None, groups.sizes, groups.size
        if src_host is not None:
            src = src_host.to(dev, non_blocking=True)
            line = src[groups.rank] < 0
            newline = groups.real & line
            cand = groups.real & ~line
            n_dev = cand.sum(1)
            n_cand, at = [], 0
            for n in groups.sizes:
                n_cand.append(int((src_host[at : at + n] >= 0).sum()))
                at += n
        check_size(self.budget, n_cand)
        ks = [budget_tokens(self.budget, n) if n else 0 for n in n_cand]

        feats = groups.gather(embeds)  # [G, n, d]
        g, n, d = feats.shape
        fn = (feats / feats.norm(dim=-1, keepdim=True)).float()
        sim = torch.bmm(fn, fn.transpose(1, 2))
        ctx.extra_flops += 2 * g * n * n * d
        if mode == "none":  # r = 1; self-similarity exactly 1, so that the first pick is the first token
            rel = torch.ones(g, n, device=dev)
            sim.diagonal(dim1=1, dim2=2).fill_(1.0)
        else:
            if mode == "clip":
                image, text, chunks = self.clip_inputs(ctx, vision, post_ln, groups, src_host)
            else:
                image, text, chunks = fn, *question_embeds(ctx, embeds, groups)
            rel = relevance(ctx, image, text, chunks, cand)
        kernel = rel[:, :, None] * sim * rel[:, None, :]
        kmax = max(ks + [1])
        picks = self.greedy(kernel.detach(), cand, kmax)  # discrete: no autograd history in the loop
        ctx.extra_flops += dpp_flops(g, n, kmax)
        chosen = groups.chosen(picks, budget_count(self.budget, n_dev))  # == ks, on the device
        kept = ks
        if newline is not None:  # always kept, beyond the budget (the official index mask keeps them)
            chosen |= groups.mark(torch.where(newline, groups.flat, groups.batch * groups.length))
            kept = [k + n - c for k, n, c in zip(ks, groups.sizes, n_cand)]
        counts = groups.counts(ctx, kept)
        ctx.decide(ctx.keep_text(chosen), counts=counts)
        return None

    # ------------------------------------------------------------------ CLIP relevance
    def clip_parts(self, device):
        if self.loaded is None:
            from transformers import AutoTokenizer, CLIPModel, CLIPTokenizerFast

            o = self.options
            model = CLIPModel.from_pretrained(o.clip) if isinstance(o.clip, str) else o.clip
            tok = o.clip_tokenizer
            if tok is None:
                tok = CLIPTokenizerFast.from_pretrained(
                    o.clip if isinstance(o.clip, str) else model.name_or_path
                )
            llm = AutoTokenizer.from_pretrained(o.tokenizer) if isinstance(o.tokenizer, str) else o.tokenizer
            self.loaded = (model.eval(), tok, llm)
        model = self.loaded[0]
        if next(model.parameters()).device != torch.device(device):
            model.to(device)
        return self.loaded

    def clip_inputs(self, ctx, vision, post_ln, groups, src_host):
        """Image embeds per group slot [G, n, P], text embeds per group [G, M, P] and chunk counts [G, 1]."""
        dev = vision.device
        model, clip_tok, llm_tok = self.clip_parts(dev)
        proj = model.visual_projection
        rows = vision.reshape(-1, vision.shape[-1])
        with torch.no_grad():
            img = proj(post_ln(rows).float().to(proj.weight.dtype)).float()  # [rows, P]
        ctx.extra_flops += 2 * rows.shape[0] * proj.in_features * proj.out_features
        if src_host is None:  # LLaVA-1.5: the projector's rows are the visual tokens, in order
            where = groups.rank
        else:
            where = src_host.to(dev, non_blocking=True).clamp(min=0)[groups.rank]
        image = img[where]
        # the question: text tokens after the last image up to the anchor, decoded, CLIP-tokenized
        ids = ctx.kwargs["input_ids"]
        q = question_mask(ctx)
        per_sample = [[t for t in row if t >= 0] for row in torch.where(q, ids, -1).tolist()]  # one read
        width = model.text_model.config.max_position_embeddings
        chunks_ids, chunks_mask, per = [], [], []
        for row in per_sample:
            text = llm_tok.decode(row, skip_special_tokens=True)
            enc = clip_tok(text=text, return_tensors="pt")
            m = enc["input_ids"].shape[1]
            c = (m - 1) // width + 1
            pad = c * width - m
            for key, out in (("input_ids", chunks_ids), ("attention_mask", chunks_mask)):
                v = enc[key]
                out.append(torch.cat([v, v.new_zeros(v.shape[0], pad)], 1).reshape(-1, width))
            per.append(c)
        tid = torch.cat(chunks_ids).to(dev)
        tmask = torch.cat(chunks_mask).to(dev)
        with torch.no_grad():
            pooled = model.text_model(input_ids=tid, attention_mask=tmask).pooler_output
            text = model.text_projection(pooled).float()  # [R, P]
        tc = model.text_model.config
        r = tid.shape[0]
        ctx.extra_flops += 2 * r * width * linear_params(model.text_model)
        ctx.extra_flops += 4 * r * width * width * tc.hidden_size * tc.num_hidden_layers
        ctx.extra_flops += 2 * r * model.text_projection.in_features * model.text_projection.out_features
        mmax = max(per)
        slot, start = [], 0
        for c in per:
            slot.append([start + i if i < c else 0 for i in range(mmax)])
            start += c
        slot = torch.tensor(slot, device=dev)  # [B, M]
        counts = torch.tensor(per, device=dev)
        gs = groups.sample_index
        text_g = text[slot[gs]]  # [G, M, P]
        cnt = counts[gs]
        return image, text_g, cnt


def clip_post_layernorm(family):
    """The post-layernorm of a CLIP vision tower (LLaVA-1.5 / -NeXT), or None (Qwen: not CLIP)."""
    model = getattr(getattr(family, "model", None), "model", None)
    tower = getattr(model, "vision_tower", None)
    return getattr(getattr(tower, "vision_model", tower), "post_layernorm", None)


def question_mask(ctx: Prefill) -> torch.Tensor:
    """[B, L] the prompt's text tokens after the sample's last image, up to its last prompt token."""
    lay = ctx.layout
    ar = torch.arange(lay.length, device=lay.is_image.device)
    last = torch.where(lay.is_image, ar[None], -1).amax(1)
    return lay.valid & ~lay.is_image & (ar[None] > last[:, None]) & (ar[None] <= lay.anchor[:, None])


def question_embeds(ctx: Prefill, embeds, groups: Groups):
    """The question tokens' input embeddings per group [G, W, d] (float) and their count per group."""
    q = question_mask(ctx)
    width = max(min(ctx.text_after_image_width() or ctx.layout.length, ctx.layout.length), 1)
    order = (~q).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]  # question tokens first
    ok = q.gather(1, order)
    e = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1])).float()
    e = torch.where(ok[..., None], e, torch.ones_like(e))  # padding: any nonzero vector (masked)
    gs = groups.sample_index
    return e[gs], ok.sum(1)[gs]


def relevance(ctx: Prefill, image, text, chunks, cand) -> torch.Tensor:
    """r [G, n] = min-max over each group's candidates of the mean over its text rows of -cos(image, text).
    image [G, n, P], text [G, M, P] (rows past ``chunks`` [G] are padding), cand [G, n]."""
    g, n, p = image.shape
    m = text.shape[1]
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    cos = torch.bmm(image, text.transpose(1, 2))  # [G, n, M]
    ctx.extra_flops += 2 * g * n * m * p
    used = torch.arange(m, device=cos.device)[None] < chunks[:, None]
    cnt = chunks.clamp(min=1).to(cos.dtype)[:, None]
    r = (-cos).masked_fill(~used[:, None], 0.0).sum(-1) / cnt
    lo = r.masked_fill(~cand, float("inf")).amin(1, keepdim=True)
    hi = r.masked_fill(~cand, float("-inf")).amax(1, keepdim=True)
    r = (r - lo + 1e-6) / (hi - lo)
    flat = (hi - lo <= 0) | (chunks[:, None] == 0)  # one candidate or no question: no preference
    r = torch.where(flat, torch.ones_like(r), r)
    return torch.where(cand, r, torch.zeros_like(r))


def dpp_greedy(kernel: torch.Tensor, cand: torch.Tensor, kmax: int) -> torch.Tensor:
    """Fast greedy MAP inference of a DPP (Chen et al. 2018) per group, exactly kmax steps: kernel
    [G, n, n] float32, cand [G, n] -> picks [G, kmax] in greedy order. Device ops only (no host reads, no
    tensors from host data), the same ops for every input of a shape: CUDA-graph safe."""
    g, n, _ = kernel.shape
    rows = torch.arange(g, device=kernel.device)
    cis = kernel.new_zeros(g, kmax, n)  # row i: the i-th pick's e
    di2 = torch.diagonal(kernel, dim1=1, dim2=2).masked_fill(~cand, float("-inf"))
    picks = []
    for i in range(kmax):
        d, j = di2.max(1)  # ties: the first index; d == di2[rows, j]
        picks.append(j)
        if i == kmax - 1:  # the last pick updates nothing that is used
            break
        row = kernel[rows, j]
        if i:  # (at i = 0 the projection is zero)
            row = row - torch.bmm(cis[rows, :i, j][:, None], cis[:, :i]).squeeze(1)
        e = torch.div(row, d.clamp(min=1e-10).sqrt()[:, None], out=cis[:, i])
        di2.sub_(e.square())
        di2.scatter_(1, j[:, None], float("-inf"))
    return torch.stack(picks, 1)


def dpp_flops(g: int, n: int, kmax: int) -> int:
    """``dpp_greedy``'s matmul FLOPs: step i (1 <= i <= kmax - 2) projects on i earlier picks."""
    return g * n * (kmax - 1) * (kmax - 2) if kmax > 2 else 0
