"""Fast greedy decoding after a (pruned) prefill: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL.

    out = mmsink.generate_fast(model, max_new_tokens=64, **inputs)   # same tokens as greedy generate()

The prefill runs through the wrapped model as usual (so every pruner's plan applies); then each layer's
keys and values move into a static buffer sized to the tokens that layer kept plus the new tokens, and
one fixed-shape decode step runs per token: the model's own modules (norms, projections, MLP, rotary
table, lm_head) with SDPA over the static buffer and a validity mask. Fixed shapes make the step
capturable as one CUDA graph (``graphs=True`` on CUDA), which removes the per-token launch overhead that
dominates batch-1 decoding. gpt-fast's idea, on a pruned cache: layers that dropped tokens hold fewer keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
MROPE = ("qwen2_vl", "qwen2_5_vl")  # 3-D positions; decoding continues from the prefill's rope_deltas


class FastDecoder:
    """Static per-layer KV buffers filled from a prefill cache, and the one-token decode step."""

    def __init__(self, model, cache, attention_mask, max_new_tokens: int):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        from .api import load_patches
        from .cache import PlanCache

        family = load_patches().family_for(model)  # generate_fast checked the model type
        lm = family.language_model
        self.rope = apply_rotary_pos_emb
        self.layers, self.embed, self.norm, self.rotary = (
            family.layers,
            lm.embed_tokens,
            lm.norm,
            lm.rotary_emb,
        )
        self.head = model.lm_head
        cfg = family.text_config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            raise ValueError("mmsink: generate_fast does not implement sliding-window attention")
        self.mrope = model.config.model_type in MROPE
        self.delta = model.model.rope_deltas if self.mrope else None  # [B, 1], set by the prefill
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        planned = isinstance(cache, PlanCache) and cache.planned
        b = attention_mask.shape[0]
        self.k, self.v, self.valid, self.start = [], [], [], []
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys, layer.values  # [B, kv_heads, n, head_dim]
            n = k.shape[2]
            valid = cache.segment_valid[cache.layer_segment[i]] if planned else attention_mask.bool()
            if valid.shape != (b, n):
                raise ValueError(f"mmsink: cache layer {i} holds {n} slots, its mask {tuple(valid.shape)}")
            cap = n + max_new_tokens
            kb = k.new_zeros(b, k.shape[1], cap, k.shape[3])
            vb = v.new_zeros(b, v.shape[1], cap, v.shape[3])
            kb[:, :, :n], vb[:, :, :n] = k, v
            ok = torch.zeros(b, cap, dtype=torch.bool, device=k.device)
            ok[:, :n] = valid.to(k.device)
            self.k.append(kb)
            self.v.append(vb)
            self.valid.append(ok)
            self.start.append(torch.tensor(n, device=k.device))
        self.pos0 = attention_mask.long().sum(1)  # the first new token's position (HF: mask cumsum)
        self.graph = None

    def step(self, tok: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits of the next token after ``tok`` [B], the ``t``-th new token (0-d long tensor)."""
        h = self.embed(tok[:, None])
        pos = (self.pos0 + t)[:, None]
        if self.mrope:  # the same position on the t, h and w axes, shifted by the image's rope delta
            pos = (pos + self.delta.to(pos.device)).expand(3, -1, -1)
        cos, sin = self.rotary(h, pos)
        b = h.shape[0]
        for layer, kb, vb, ok, start in zip(self.layers, self.k, self.v, self.valid, self.start):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, 1, self.heads, -1).transpose(1, 2)
            k = attn.k_proj(x).view(b, 1, self.kv_heads, -1).transpose(1, 2)
            v = attn.v_proj(x).view(b, 1, self.kv_heads, -1).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            slot = (start + t).view(1)
            kb.index_copy_(2, slot, k)
            vb.index_copy_(2, slot, v)
            ok.index_fill_(1, slot, True)
            o = F.scaled_dot_product_attention(
                q,
                kb,
                vb,
                attn_mask=ok[:, None, None, :],
                scale=attn.scaling,
                enable_gqa=self.heads != self.kv_heads,
            )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.head(self.norm(h))[:, -1]

    def capture(self, tok: torch.Tensor) -> None:
        """Record ``step`` as one CUDA graph (static input buffers; replayed per token)."""
        self.tok_in, self.t_in = tok.clone(), torch.zeros((), dtype=torch.long, device=tok.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up writes slot 0, which the first real step overwrites
            for _ in range(2):
                self.step(self.tok_in, self.t_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_out = self.step(self.tok_in, self.t_in)

    def next_logits(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        if self.graph is None:
            return self.step(tok, torch.tensor(t, device=tok.device))
        self.tok_in.copy_(tok)
        self.t_in.fill_(t)
        self.graph.replay()
        return self.logits_out


@torch.no_grad()
def generate_fast(model, max_new_tokens: int = 32, graphs: bool | None = None, **inputs) -> torch.Tensor:
    """Greedy decoding, the same tokens as ``model.generate(**inputs, do_sample=False)``: prompt ids
    followed by the new tokens, padded with the pad id after a sample's end-of-sequence token.
    ``graphs``: capture the decode step as a CUDA graph (default: on for CUDA models)."""
    from .api import get_handle

    if model.config.model_type not in SUPPORTED:
        raise ValueError(
            f"mmsink: generate_fast supports {SUPPORTED}, not {model.config.model_type!r}; use model.generate"
        )
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    try:
        handle = get_handle(model)
    except ValueError:
        handle = None
    if handle is not None and handle.var is not None and handle.enabled:
        raise ValueError("mmsink: generate_fast does not run VAR's decode-time redistribution; use generate")
    prev = handle.prompt_len if handle is not None else None
    if handle is not None:
        handle.prompt_len = ids.shape[1]  # selection anchored to the prompt's last token, as generate does
    try:
        # positions as generate makes them for left-padded prompts (the decode step continues from these)
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        call = {**inputs, "attention_mask": mask}
        if model.config.model_type not in MROPE:  # Qwen computes its 3-D positions (and rope deltas) itself
            call.setdefault("position_ids", pos)
        out = model(**call, use_cache=True, logits_to_keep=1)
    finally:
        if handle is not None:
            handle.prompt_len = prev
    gen = model.generation_config
    eos = gen.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=ids.device)
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0].item() if eos.numel() else 0)
    tok = out.logits[:, -1].argmax(-1)
    new = [tok]
    done = torch.isin(tok, eos)
    if max_new_tokens > 1 and not bool(done.all()):
        dec = FastDecoder(model, out.past_key_values, mask, max_new_tokens - 1)
        if graphs if graphs is not None else ids.is_cuda:
            dec.capture(tok)
        for t in range(max_new_tokens - 1):
            tok = dec.next_logits(tok, t).argmax(-1)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            new.append(tok)
            done = done | torch.isin(tok, eos)
            if (t + 1) % 8 == 0 and bool(done.all()):  # a sync every 8 tokens, not every token
                break
    out_ids = torch.cat([ids, torch.stack(new, 1)], 1)
    # like generate: stop at the step where every sample has finished
    fin = torch.isin(out_ids[:, ids.shape[1] :], eos)
    if eos.numel() and bool(fin.any(1).all()):
        last = int(fin.float().argmax(1).max())  # the latest first-eos over samples
        out_ids = out_ids[:, : ids.shape[1] + last + 1]
    return out_ids
