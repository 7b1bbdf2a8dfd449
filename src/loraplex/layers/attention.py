"""Attention over the paged KV cache.

Per layer the cache is two tensors ``[num_slots, n_kv_heads, head_dim]`` (slot = block * block_size + offset).
A step's tokens are laid out decodes first (one token each), then prefill chunks. New K/V are written at
``slot_mapping``; decodes attend in one padded batch over their gathered slots; each prefill chunk attends causally
(from its own K/V when it starts at position 0, else over its gathered slots with an offset causal mask).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """Tokens ``[q_start, q_end)`` of the step, at positions ``start_pos ..``; ``kv_slots`` None = no earlier context."""

    q_start: int
    q_end: int
    start_pos: int
    kv_slots: torch.Tensor | None = None  # [start_pos + n] slots of the whole context
    mask: torch.Tensor | None = None  # [n, start_pos + n] bool, True = may attend


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every layer, built once by the model runner."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V go
    num_decodes: int = 0
    decode_kv_slots: torch.Tensor | None = None  # [num_decodes, max_context] (padded with slot 0)
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_context] bool
    prefills: list[PrefillChunk] = field(default_factory=list)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **kw) -> torch.Tensor:
    """``q: [B, H, Lq, D]``, ``k, v: [B, Hkv, Lk, D]`` → ``[B, H, Lq, D]`` (grouped-query heads broadcast)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """``q: [T, H, D]``, ``k, v: [T, Hkv, D]``; writes k/v into the caches and returns ``[T, H, D]``."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        kk = k_cache[meta.decode_kv_slots].transpose(1, 2)  # [nd, Hkv, L, D]
        vv = v_cache[meta.decode_kv_slots].transpose(1, 2)
        o = _sdpa(q[:nd].unsqueeze(2), kk, vv, scale, attn_mask=meta.decode_mask)  # [nd, H, 1, D]
        out[:nd] = o.squeeze(2)
    for p in meta.prefills:
        qq = q[p.q_start:p.q_end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if p.kv_slots is None:
            kk = k[p.q_start:p.q_end].transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
            vv = v[p.q_start:p.q_end].transpose(0, 1).unsqueeze(0)
            o = _sdpa(qq, kk, vv, scale, is_causal=True)
        else:
            kk = k_cache[p.kv_slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            vv = v_cache[p.kv_slots].transpose(0, 1).unsqueeze(0)
            o = _sdpa(qq, kk, vv, scale, attn_mask=p.mask)
        out[p.q_start:p.q_end] = o[0].transpose(0, 1)
    return out
