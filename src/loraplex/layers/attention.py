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

from loraplex.ops import attention_cpu


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

    slot_mapping: torch.Tensor  # [T] int64 where each new token's K/V go
    num_decodes: int = 0
    decode_kv_slots: torch.Tensor | None = None  # [num_decodes, max_context] int64 (padded with slot 0)
    decode_lens: torch.Tensor | None = None  # [num_decodes] int64 context lengths (what the C kernel reads)
    prefills: list[PrefillChunk] = field(default_factory=list)
    rows: "PagedRows | None" = None  # set when the step runs the Triton kernel (then the fields above are unused)
    # --deterministic: every row (decodes too) as a chunk whose kv_slots cover positions 0 .. end - 1; each token
    # then attends alone over exactly its own context (then the fields above are unused)
    token_rows: list[PrefillChunk] | None = None


@dataclass
class PagedRows:
    """The Triton kernel's view of a step: per row its block table and where its queries sit (int32 tensors)."""

    block_tables: torch.Tensor  # [R, max_blocks]
    q_start: torch.Tensor  # [R] first step token of the row
    q_len: torch.Tensor  # [R]
    start_pos: torch.Tensor  # [R] position of its first query
    max_q_len: int
    block_size: int


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """``q: [T, H, D]``, ``k, v: [T, Hkv, D]``; writes k/v into the caches and returns ``[T, H, D]``.

    Semantics: ``out[t] = softmax(scale * q[t] @ K[ctx(t)].T) @ V[ctx(t)]`` where ``ctx(t)`` are the cache slots of
    positions ``0 .. pos(t)`` of t's sequence, and query head h reads kv head ``h // (H // Hkv)``.
    """
    c_kernels = attention_cpu.serves(q, k, v, k_cache, v_cache) and meta.slot_mapping.dtype == torch.int64
    if c_kernels:
        attention_cpu.kv_write(k, v, k_cache, v_cache, meta.slot_mapping, checked=True)
    else:
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.rows is not None:
        from loraplex.ops.attention_triton import paged_attention_triton

        r = meta.rows
        return paged_attention_triton(q, k_cache, v_cache, r.block_tables, r.q_start, r.q_len, r.start_pos,
                                      r.max_q_len, r.block_size, scale)
    if meta.token_rows is not None:
        return _attention_per_token(q, k_cache, v_cache, meta.token_rows, scale)
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], k.shape[2]
    parts = []
    nd = meta.num_decodes
    if nd and c_kernels and meta.decode_lens is not None and meta.decode_lens.dtype == torch.int64 \
            and meta.decode_kv_slots.dtype == torch.int64 and meta.decode_kv_slots.is_contiguous():
        parts.append(attention_cpu.decode_attention(q[:nd], k_cache, v_cache, meta.decode_kv_slots, meta.decode_lens,
                                                    scale, checked=True))
    elif nd:
        nd_slots = meta.decode_kv_slots  # [nd, L]
        kk = k_cache.index_select(0, nd_slots.view(-1)).view(nd, -1, num_kv_heads, head_dim).transpose(1, 2)
        vv = v_cache.index_select(0, nd_slots.view(-1)).view(nd, -1, num_kv_heads, head_dim).transpose(1, 2)
        # Grouped-query trick: a decode has one query per head, so the heads sharing a kv head become that kv
        # head's "query rows" — no repeat of K/V needed.
        qq = q[:nd].view(nd, num_kv_heads, num_heads // num_kv_heads, head_dim)
        valid = torch.arange(nd_slots.shape[1], device=q.device) < meta.decode_lens.unsqueeze(1)  # [nd, L]
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=valid[:, None, None, :], scale=scale)
        parts.append(o.reshape(nd, num_heads, head_dim))
    for p in meta.prefills:
        qq = q[p.q_start:p.q_end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if p.kv_slots is None:
            kk = k[p.q_start:p.q_end].transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
            vv = v[p.q_start:p.q_end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qq, kk, vv, scale=scale, is_causal=True, enable_gqa=True)
        else:
            kk = k_cache.index_select(0, p.kv_slots).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            vv = v_cache.index_select(0, p.kv_slots).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=p.mask, scale=scale, enable_gqa=True)
        parts.append(o[0].transpose(0, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _attention_per_token(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: list[PrefillChunk],
                         scale: float) -> torch.Tensor:
    """Batch-invariant attention: one SDPA call per token over exactly its context (no padding, no neighbours), in
    the same call shape whether the token is decoded or prefilled, alone or beside others, in one chunk or several:
    its bits depend only on its own query and context."""
    num_heads, num_kv_heads, head_dim = q.shape[1], k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for row in rows:
        kk = k_cache.index_select(0, row.kv_slots)  # [end, Hkv, D]
        vv = v_cache.index_select(0, row.kv_slots)
        for t in range(row.q_start, row.q_end):
            n = row.start_pos + t - row.q_start + 1  # positions 0 .. pos(t)
            qq = q[t].view(1, num_kv_heads, num_heads // num_kv_heads, head_dim)  # heads sharing a kv head as rows
            o = F.scaled_dot_product_attention(qq, kk[:n].transpose(0, 1).unsqueeze(0),
                                               vv[:n].transpose(0, 1).unsqueeze(0), scale=scale)
            out[t] = o.view(num_heads, head_dim)
    return out
