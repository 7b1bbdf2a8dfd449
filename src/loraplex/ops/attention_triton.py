"""Paged attention in Triton over the block tables, without gathering the KV cache: one kernel for a step's decodes
and prefill chunks (a decode is a chunk of one query). CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
Torch reference: ``layers.attention.paged_attention`` (gathered slots + SDPA).

Semantics: for row r with queries at positions ``start_pos[r] .. start_pos[r] + q_len[r] - 1`` (step tokens
``q_start[r] ..``), ``out[t, h] = softmax(scale · q[t, h] · K[slots(0 .. pos(t)), h // G]) · V[…]`` where
``slot(p) = block_tables[r, p // block_size] · block_size + p % block_size`` and ``G = H / Hkv`` (GQA).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, q_start_ptr, q_len_ptr, start_pos_ptr,
                     stride_qt, stride_qh, stride_ks, stride_kh, stride_ot, stride_oh, stride_bt,
                     scale, D, GROUP: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    r, h, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, q_len, start_pos = tl.load(q_start_ptr + r), tl.load(q_len_ptr + r), tl.load(start_pos_ptr + r)
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    mmask, dmask = offs_m < q_len, offs_d < D
    pos = start_pos + tl.where(mmask, offs_m, 0)  # rows past the chunk act as its first query (never stored)
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    kvh = h // GROUP
    # keys this tile can see: up to its last query's position (causal); none when the tile is past the chunk
    hi = tl.where(m * BLOCK_M < q_len, tl.minimum(start_pos + q_len, start_pos + (m + 1) * BLOCK_M), 0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        blk = tl.load(bt_ptr + r * stride_bt + offs_n // KV_BLOCK, mask=nmask, other=0)
        slot = blk * KV_BLOCK + offs_n % KV_BLOCK
        kv_off = slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0)
        s = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision=PRECISION) * scale
        s = tl.where(nmask[None, :] & (offs_n[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i = 0 only in a tile past the chunk (never stored)
    tl.store(o_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           q_start: torch.Tensor, q_len: torch.Tensor, start_pos: torch.Tensor, max_q_len: int,
                           block_size: int, scale: float) -> torch.Tensor:
    """``q: [T, H, D]``; caches ``[num_slots, Hkv, D]`` (already holding this step's K/V); ``block_tables: [R, B]``
    int32 and per row ``q_start, q_len, start_pos: [R]`` int32 → ``[T, H, D]``."""
    t, heads, d = q.shape
    out = torch.empty_like(q)
    rows = q_start.shape[0]
    block_m = max(16, min(64, triton.next_power_of_2(max_q_len)))
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    fp32 = q.dtype == torch.float32 or interp  # the interpreter mis-multiplies bf16 tiles (see lora_triton)
    _paged_attention[(rows, heads, triton.cdiv(max_q_len, block_m))](
        q, k_cache, v_cache, out, block_tables, q_start, q_len, start_pos,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), scale, d, GROUP=heads // k_cache.shape[1], KV_BLOCK=block_size, BLOCK_M=block_m,
        BLOCK_N=max(16, min(64, block_size)), HEAD_D=max(16, triton.next_power_of_2(d)),
        DOT=tl.float32 if fp32 else (tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16),
        PRECISION="ieee" if fp32 else None)
    return out
