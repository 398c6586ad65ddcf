"""Qwen2-VL and Qwen2.5-VL (transformers ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): dynamic resolution and M-RoPE.

The image's token count comes from ``image_grid_thw`` (t * h * w / merge^2). M-RoPE needs nothing
special from the plan: the text model turns the 3-D (t, h, w) position ids into one cos/sin row per
token before the decoder layers, and the plan gathers those rows, so kept tokens keep their 3-D
positions; decode steps take their positions from the attention mask and the model's ``rope_deltas``.
Vision FLOPs: the tower's linears run once per patch; its attention (full per image in Qwen2-VL,
windowed in most Qwen2.5-VL layers) is counted from the sequence lengths each attention call gets.
"""

from __future__ import annotations

import torch

from mmsink.core import received as received_kernel
from mmsink.core.family import Family as Protocol
from mmsink.core.family import VisionTokens
from mmsink.core.layout import build_layout

CHUNK = 1024  # query rows per step when scoring VisionZip's received attention


def vision_utils():
    """transformers' helpers whose results a Qwen vision tower takes precomputed (5.x), or None."""
    try:
        from transformers import vision_utils as vu
    except ImportError:
        return None
    names = ("get_vision_cu_seqlens", "get_vision_position_ids", "get_vision_window_index")
    return vu if all(hasattr(vu, n) for n in names) else None


class Family(Protocol):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    class_name = "Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration"
    mrope = True

    def __init__(self, model):
        if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "language_model"):
            raise ValueError(
                f"mmsink: wrap the {self.class_name} (with its lm_head), not {type(model).__name__}"
            )
        super().__init__(model, model.model.language_model, model.model.visual.merger)
        self.visual = model.model.visual
        self.merge = self.config.vision_config.spatial_merge_size
        self.attn_sq = 0  # sum over vision attention calls of heads*dim*len^2 (reset every prefill)
        self.seam = None  # set by install: the running prefill, where the scores' work is counted per sample

    def regcache_tower(self):
        """RegCache's view of the tower: blocks, keys and values without rotary (registers have no position),
        every linear of a block quantized, the image of each packed row from ``grid_thw``."""
        v = self.visual
        blocks = list(v.blocks)

        def kv(i, rows):
            b = blocks[i]
            qkv = b.attn.qkv(b.norm1(rows)).view(len(rows), 3, b.attn.num_heads, -1)
            return qkv[:, 1], qkv[:, 2]

        def linears(i):
            return [m for m in blocks[i].modules() if isinstance(m, torch.nn.Linear)]

        def images(args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            x = args[0] if args else kwargs["hidden_states"]
            n = grid.prod(-1).to(x.device)
            return torch.repeat_interleave(torch.arange(len(n), device=x.device), n)

        def run(batch):
            return v(batch["pixel_values"].to(v.dtype), grid_thw=batch["image_grid_thw"]).last_hidden_state

        attns = [b.attn for b in blocks]
        return dict(tower=v, blocks=blocks, attns=attns, kv=kv, linears=linears, run=run, images=images)

    def rope_deltas(self):
        return self.model.model.rope_deltas

    def vit_norms(self, features, kwargs) -> list:
        """The merger reads patches in groups of merge^2 (one group per visual token); a token's norm is
        the largest of its patches'. Qwen2.5-VL orders the groups by attention window; undo that."""
        unit = self.merge**2
        norms = features.float().norm(dim=-1).view(-1, unit).amax(1)
        thw = kwargs.get("image_grid_thw")
        order = self.raster_order(thw, norms.device)
        if order is not None:
            norms = norms[order]
        counts = [int(t * h * w) // unit for t, h, w in thw.tolist()]
        return list(norms.split(counts))

    def raster_order(self, thw, device):
        """Qwen2.5-VL's merger reads tokens in attention-window order: for each token in raster order,
        its row in the merger's order (None for Qwen2-VL, which keeps raster order)."""
        if not hasattr(self.visual, "window_size"):
            return None
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

        window_index, _ = get_vision_window_index(
            thw,
            spatial_merge_size=self.merge,
            window_size=self.visual.window_size,
            patch_size=self.visual.patch_size,
            kwargs={},
        )
        return torch.argsort(window_index.to(device))

    # ---- vision-stage scores: no [CLS], so tokens are ranked by the attention they receive in the last block
    def vision_taps(self) -> list:
        attn = self.visual.blocks[-1].attn
        return [("inputs", attn, "kwargs"), ("qkv", attn.qkv, "output")]

    def vision_tokens(self, features, kwargs, taps: dict) -> VisionTokens:
        """Merger input [patches, D] as one row per image (raster order, padded to the largest image).
        Scores: the attention each patch receives in the last block (its own attention segments, rotary
        applied as the block does), mean over heads and queries, then per token (mean over its merge^2
        patches); keys: raw keys, mean over heads and over the token's patches."""
        score, metric, work = self.received(taps)
        unit = self.merge**2
        groups = features.reshape(-1, unit * features.shape[-1])
        thw = kwargs.get("image_grid_thw")
        grid = thw.tolist()
        flops = self.count_scores(work, grid)
        order = self.raster_order(thw, features.device)
        if order is not None:
            score, metric, groups = score[order], metric[order], groups[order]
        counts = [int(t * h * w) // unit for t, h, w in grid]
        pad = torch.nn.utils.rnn.pad_sequence
        rows = [pad(list(x.split(counts)), batch_first=True) for x in (groups, score, metric)]
        present = pad(
            [torch.ones(n, dtype=torch.bool, device=features.device) for n in counts], batch_first=True
        )

        def put(f):
            out = torch.cat([r[:n] for r, n in zip(f, counts)])
            if order is not None:
                back = torch.empty_like(out)
                back[order] = out
                out = back
            return out.view_as(features)

        def to_sequence(keep):
            return torch.cat([k[:n] for k, n in zip(keep, counts)])

        return VisionTokens(*rows, counts, [1] * len(counts), present, to_sequence, put, flops)

    def count_scores(self, work: list, grid: list) -> float:
        """The scores' FLOPs (``work``: per attention segment, a frame of an image) left for the caller to
        count: none when they are counted here on the running prefill, per sample (an image's work is
        quadratic in its size: no share of the batch's total is a sample's own)."""
        ctx = self.seam.prefill() if self.seam is not None else None
        if ctx is None:
            return sum(work)
        frames = iter(work)
        per_image = [sum(next(frames) for _ in range(int(t))) for t, _, _ in grid]
        first, per_sample = 0, []
        for sizes in ctx.layout.sizes:  # images in sequence order
            per_sample.append(sum(per_image[first : first + len(sizes)]))
            first += len(sizes)
        ctx.add_flops(sum(work), per_sample)
        return 0

    def received(self, taps: dict):
        """(score [tokens], keys [tokens, head_dim], work): attention received per merged token in the last
        vision block, in the merger's order; ``work``: its FLOPs per attention segment."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        qkv, inputs = taps["qkv"], taps["inputs"]
        cu, (cos, sin) = inputs["cu_seqlens"], inputs["position_embeddings"]
        attn = self.visual.blocks[-1].attn
        n, heads = qkv.shape[0], attn.num_heads
        q, k, _ = qkv.view(n, 3, heads, -1).unbind(1)
        metric = k.float().mean(1)  # [patches, head_dim]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        received = torch.zeros(n, device=qkv.device)
        hd, work = q.shape[-1], []
        bounds = cu.tolist()  # host bounds (precomputed inputs), or one read
        for s, e in zip(bounds[:-1], bounds[1:]):
            qs, ks = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1)  # [H, P, hd] views
            # the kernels for a whole segment (no [H, rows, P] logits written) where they run, else the
            # GEMM with fp32 output over CHUNK query rows at a time
            acc = received_kernel.column_sums(qs, ks, attn.scaling, CHUNK, softmax_column_sums)
            received[s:e] = acc.mean(0) / (e - s)
            work.append(2 * heads * (e - s) ** 2 * hd)
        unit = self.merge**2
        score = received.view(-1, unit).mean(1)
        return score, metric.view(-1, unit, metric.shape[-1]).mean(1), work

    def layout(self, input_ids, attention_mask, prompt_len, kwargs=None, grids: bool = False):
        lay = build_layout(input_ids, attention_mask, self.config.image_token_id, None, prompt_len, None)
        thw = (kwargs or {}).get("image_grid_thw")
        if grids and thw is not None:  # one read of the image grids, only for a pruner that uses them
            per = [(h // self.merge, w // self.merge) if t == 1 else None for t, h, w in thw.tolist()]
            it = iter(per)
            lay.grids = [[next(it) for _ in row] for row in lay.sizes]
        return lay

    # ---- vision FLOPs
    def install(self, seam) -> list:
        self.seam = seam

        def hook(module, args, kwargs):
            cu = kwargs.get("cu_seqlens")
            if cu is not None and seam.measuring:
                lens = (cu[1:] - cu[:-1]).double()
                width = module.proj.in_features
                self.attn_sq = self.attn_sq + 4 * width * (lens * lens).sum()  # on device: read once, later

        def precompute(module, args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if grid is None or not isinstance(grid, torch.Tensor) or "cu_seqlens" in kwargs:
                return None
            kwargs.update(self.vision_inputs(grid, (args[0] if args else kwargs["hidden_states"]).device))
            return args, kwargs

        hooks = [
            m.register_forward_pre_hook(hook, with_kwargs=True)
            for m in self.visual.modules()
            if type(m).__name__.endswith("VisionAttention")
        ]
        if vision_utils() is not None:
            hooks.append(self.visual.register_forward_pre_hook(precompute, with_kwargs=True))
        return hooks

    def vision_inputs(self, grid: torch.Tensor, device) -> dict:
        """The tower's data-dependent inputs (sequence bounds, rotary positions, attention windows) from one
        read of ``grid_thw``, through transformers' own helpers on a host copy, handed to the tower as the
        precomputed kwargs it takes: otherwise every vision block reads its split sizes from the device
        (one sync per block). Bounds stay on the host unless a flash kernel wants them on the device."""
        from transformers.utils.generic import is_flash_attention_requested

        vu, v = vision_utils(), self.visual
        host = grid.cpu()
        flash = is_flash_attention_requested(v.config)

        def bounds(cu, name):
            if not flash:
                return {name: cu}
            top = "max_seqlen" if name == "cu_seqlens" else "max_window_seqlen"
            return {name: cu.to(device), top: int((cu[1:] - cu[:-1]).max())}

        out = {"position_ids": vu.get_vision_position_ids(host, v.spatial_merge_size).to(device)}
        out |= bounds(vu.get_vision_cu_seqlens(host), "cu_seqlens")
        if hasattr(v, "window_size"):  # Qwen2.5-VL's windowed blocks
            index, cu = vu.get_vision_window_index(
                host,
                spatial_merge_size=v.spatial_merge_size,
                window_size=v.window_size,
                patch_size=v.patch_size,
            )
            out["window_index"] = index.to(device)
            out |= bounds(cu, "cu_window_seqlens")
        return out

    def reset_measure(self):
        self.attn_sq = 0

    def patch_flops(self, patches: int, in_dim: int) -> int:
        embed = self.visual.patch_embed.proj
        conv = 2 * patches * in_dim * embed.out_channels
        blocks = 2 * patches * self.linear(self.visual.blocks)
        merger = 2 * (patches // self.merge**2) * self.linear(self.visual.merger)
        return conv + blocks + merger

    def vision_flops(self, pixel_values, kwargs=None) -> int:
        if pixel_values is None:
            return 0
        return self.patch_flops(pixel_values.shape[0], pixel_values.shape[1]) + int(self.attn_sq)

    def image_vision_flops(self, pixel_values, kwargs=None) -> list[float]:
        thw = (kwargs or {}).get("image_grid_thw")
        if pixel_values is None or thw is None:
            return []
        patches = [int(t * h * w) for t, h, w in thw.tolist()]
        total_sq = sum(p * p for p in patches)
        return [
            self.patch_flops(p, pixel_values.shape[1]) + int(self.attn_sq) * (p * p) / max(total_sq, 1)
            for p in patches
        ]


def softmax_column_sums(q, k, scale: float) -> torch.Tensor:
    """[H, P] fp32: per head, the softmax rows of ``q`` [H, C, hd] against ``k`` [H, P, hd] summed over the
    C queries. Half-precision inputs on CUDA: one tensor-core GEMM with fp32 output (products of half values
    are exact in fp32 and it sums in fp32: the fp32 GEMM's logits up to summation order)."""
    logits = None
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            logits = torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without the fp32-output GEMM: the fp32 one below
            logits = None
    if logits is None:
        logits = q.float() @ k.float().transpose(1, 2)
    return torch.softmax(logits.mul_(scale), -1).sum(1)
