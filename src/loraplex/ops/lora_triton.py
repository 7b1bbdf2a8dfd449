"""Triton LoRA kernels (punica's shrink / expand), reading the slot buffers in place; CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1`` (how CI tests them). Torch references: ``lora_torch.bgmv_shrink`` / ``bgmv_expand``
(BGMV) and ``ops.add_lora_segment`` (SGMV).

Shapes as in ``lora_torch``: ``x: [T, in]``, ``lora_a: [S, n·R, in]`` (n stacked slices of max rank R),
``lora_b: [S, out, R]``, ``slots / weights: [T, K]``. ``ranks: [S]`` (int32) is each slot's true rank: rows and
columns beyond it are zero padding that the kernels skip instead of multiplying.
  BGMV shrink:  h[t, k, i·R + j] = w[t, k] · x[t] · A[s, i·R + j]        s = slots[t, k], j < ranks[s]
  BGMV expand:  y[t, o] += Σ_k Σ_{j < ranks[s]} B[s, o, j] · h[t, k, j]
  SGMV:         the same for segments of tokens sharing one slot (one launch for every segment of the step).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _bgmv_shrink(x_ptr, a_ptr, slots_ptr, w_ptr, ranks_ptr, h_ptr, K, N_IN, R, N_SLICES,
                 stride_x, stride_as, stride_ar, stride_h,
                 HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_IN: tl.constexpr):
    tk = tl.program_id(0)  # one (token, pair)
    piece = tl.program_id(1)  # slice i, rank block b
    n_rblocks = tl.cdiv(R, BLOCK_R)
    i, b = piece // n_rblocks, piece % n_rblocks
    t = tk // K
    s = tl.load(slots_ptr + tk)
    rank = tl.load(ranks_ptr + s)
    offs_r = b * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    rows = i * R + offs_r
    rmask = offs_r < rank
    n_in = tl.where(b * BLOCK_R < rank, N_IN, 0)  # a block of zero padding (rank < R): nothing to read
    for start in range(0, n_in, BLOCK_IN):
        offs_in = start + tl.arange(0, BLOCK_IN)
        imask = offs_in < N_IN
        xv = tl.load(x_ptr + t * stride_x + offs_in, mask=imask, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + s * stride_as + rows[:, None] * stride_ar + offs_in[None, :],
                     mask=rmask[:, None] & imask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(av * xv[None, :], axis=1)
    if HAS_W:
        acc *= tl.load(w_ptr + tk).to(tl.float32)
    tl.store(h_ptr + tk * stride_h + i * R + offs_r, acc.to(h_ptr.dtype.element_ty), mask=offs_r < R)


@triton.jit
def _bgmv_expand(h_ptr, b_ptr, slots_ptr, ranks_ptr, y_ptr, K, N_OUT, R, H_OFF,
                 stride_h, stride_bs, stride_bo, stride_y,
                 BLOCK_OUT: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    offs_o = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    omask = offs_o < N_OUT
    acc = tl.zeros([BLOCK_OUT], dtype=tl.float32)
    for k in range(0, K):
        s = tl.load(slots_ptr + t * K + k)
        rank = tl.load(ranks_ptr + s)
        for start in range(0, rank, BLOCK_R):
            offs_r = start + tl.arange(0, BLOCK_R)
            rmask = offs_r < rank
            hv = tl.load(h_ptr + (t * K + k) * stride_h + H_OFF + offs_r, mask=rmask, other=0.0).to(tl.float32)
            bv = tl.load(b_ptr + s * stride_bs + offs_o[:, None] * stride_bo + offs_r[None, :],
                         mask=omask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(bv * hv[None, :], axis=1)
    y_ptrs = y_ptr + t * stride_y + offs_o
    y = tl.load(y_ptrs, mask=omask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _sgmv_shrink(x_ptr, a_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, seg_w_ptr, ranks_ptr, h_ptr,
                 N_IN, R, stride_x, stride_as, stride_ar, stride_h,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_IN: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr):
    g, m, piece = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_rblocks = tl.cdiv(R, BLOCK_R)
    i, b = piece // n_rblocks, piece % n_rblocks
    length = tl.load(seg_len_ptr + g)
    start, s = tl.load(seg_start_ptr + g), tl.load(seg_slot_ptr + g)
    rank = tl.load(ranks_ptr + s)
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = b * BLOCK_R + tl.arange(0, BLOCK_R)
    mmask, rmask = offs_m < length, offs_r < rank
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    n_in = tl.where((b * BLOCK_R < rank) & (m * BLOCK_M < length), N_IN, 0)  # padding / past the segment: skip
    for k0 in range(0, n_in, BLOCK_IN):
        offs_in = k0 + tl.arange(0, BLOCK_IN)
        imask = offs_in < N_IN
        xv = tl.load(x_ptr + (start + offs_m)[:, None] * stride_x + offs_in[None, :],
                     mask=mmask[:, None] & imask[None, :], other=0.0)
        av = tl.load(a_ptr + s * stride_as + (i * R + offs_r)[None, :] * stride_ar + offs_in[:, None],
                     mask=rmask[None, :] & imask[:, None], other=0.0)
        acc += tl.dot(xv.to(DOT), av.to(DOT), input_precision=PRECISION)
    acc *= tl.load(seg_w_ptr + g)
    tl.store(h_ptr + (start + offs_m)[:, None] * stride_h + (i * R + offs_r)[None, :],
             acc.to(h_ptr.dtype.element_ty), mask=mmask[:, None] & (offs_r < R)[None, :])


@triton.jit
def _sgmv_expand(h_ptr, b_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, ranks_ptr, y_ptr,
                 N_OUT, H_OFF, stride_h, stride_bs, stride_bo, stride_y,
                 BLOCK_M: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_R: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr):
    g, m, o = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(seg_len_ptr + g)
    start, s = tl.load(seg_start_ptr + g), tl.load(seg_slot_ptr + g)
    rank = tl.where(m * BLOCK_M < length, tl.load(ranks_ptr + s), 0)  # past the segment: no work
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    mmask, omask = offs_m < length, offs_o < N_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_OUT], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rmask = offs_r < rank
        hv = tl.load(h_ptr + (start + offs_m)[:, None] * stride_h + H_OFF + offs_r[None, :],
                     mask=mmask[:, None] & rmask[None, :], other=0.0)
        bv = tl.load(b_ptr + s * stride_bs + offs_o[None, :] * stride_bo + offs_r[:, None],
                     mask=omask[None, :] & rmask[:, None], other=0.0)
        acc += tl.dot(hv.to(DOT), bv.to(DOT), input_precision=PRECISION)
    y_ptrs = y_ptr + (start + offs_m)[:, None] * stride_y + offs_o[None, :]
    ymask = mmask[:, None] & omask[None, :]
    y = tl.load(y_ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=ymask)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _dot_args(dtype: torch.dtype) -> dict:
    """fp32 tiles multiply in full precision (no TF32: the torch reference is the oracle); bf16/fp16 tiles in their
    own type, accumulated in fp32 — on a GPU: Triton's interpreter mis-multiplies bf16 ``tl.dot`` tiles, so there
    they are multiplied in fp32 (the bf16 dot itself is covered by tests/gpu)."""
    if dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1":
        return {"DOT": tl.float32, "PRECISION": "ieee"}
    return {"DOT": tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, "PRECISION": None}


def _full_ranks(lora_a: torch.Tensor, n_slices: int, ranks: torch.Tensor | None) -> torch.Tensor:
    if ranks is not None:
        return ranks
    return torch.full((lora_a.shape[0],), lora_a.shape[1] // n_slices, dtype=torch.int32, device=lora_a.device)


def add_lora_bgmv_triton(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bs: list[torch.Tensor],
                         out_slices: list[tuple[int, int]], slots: torch.Tensor, weights: torch.Tensor | None,
                         ranks: torch.Tensor | None = None) -> None:
    """``ops.add_lora_bgmv``'s semantics: one shrink over all stacked slices, one expand per output slice."""
    t, k = slots.shape
    n, r = len(lora_bs), lora_bs[0].shape[-1]
    ranks = _full_ranks(lora_a, n, ranks)
    slots = slots.reshape(-1).to(torch.int32).contiguous()
    w = weights.reshape(-1).float().contiguous() if weights is not None else slots  # unread when HAS_W is off
    h = torch.empty(t * k, n * r, dtype=torch.float32, device=x.device)
    block_r = _block(r, 16, 64)
    _bgmv_shrink[(t * k, n * triton.cdiv(r, block_r))](
        x, lora_a, slots, w, ranks, h, k, x.shape[1], r, n, x.stride(0), lora_a.stride(0), lora_a.stride(1),
        h.stride(0), HAS_W=weights is not None, BLOCK_R=block_r, BLOCK_IN=_block(x.shape[1], 32, 256))
    for i, ((start, size), lora_b) in enumerate(zip(out_slices, lora_bs)):
        yv = y.narrow(-1, start, size)
        block_o = _block(size, 32, 128)
        _bgmv_expand[(t, triton.cdiv(size, block_o))](
            h, lora_b, slots, ranks, yv, k, size, r, i * r, h.stride(0), lora_b.stride(0), lora_b.stride(1),
            yv.stride(0), BLOCK_OUT=block_o, BLOCK_R=_block(r, 16, 64))


def add_lora_segments_triton(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bs: list[torch.Tensor],
                             out_slices: list[tuple[int, int]], segments, ranks: torch.Tensor | None = None) -> None:
    """Every SGMV segment of the step in one shrink launch and one expand launch per output slice. Segments of a
    mixture's chunk (the same tokens once per adapter) each add their own weighted share."""
    n, r = len(lora_bs), lora_bs[0].shape[-1]
    ranks = _full_ranks(lora_a, n, ranks)
    dev = x.device
    dot = _dot_args(x.dtype)
    groups = _disjoint(segments)  # the h buffer is per token: overlapping segments go in separate launches
    for group in groups:
        starts = torch.tensor([s.start for s in group], dtype=torch.int32, device=dev)
        lens = torch.tensor([s.end - s.start for s in group], dtype=torch.int32, device=dev)
        seg_slots = torch.tensor([s.slot for s in group], dtype=torch.int32, device=dev)
        seg_w = torch.tensor([s.weight for s in group], dtype=torch.float32, device=dev)
        longest = max(s.end - s.start for s in group)
        block_m, block_r = _block(longest, 16, 64), _block(r, 16, 64)
        m_blocks = triton.cdiv(longest, block_m)
        h = torch.zeros(x.shape[0], n * r, dtype=torch.float32, device=dev)
        _sgmv_shrink[(len(group), m_blocks, n * triton.cdiv(r, block_r))](
            x, lora_a, starts, lens, seg_slots, seg_w, ranks, h, x.shape[1], r, x.stride(0), lora_a.stride(0),
            lora_a.stride(1), h.stride(0), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_IN=_block(x.shape[1], 16, 64),
            **dot)
        for i, ((start, size), lora_b) in enumerate(zip(out_slices, lora_bs)):
            yv = y.narrow(-1, start, size)
            block_o = _block(size, 16, 64)
            _sgmv_expand[(len(group), m_blocks, triton.cdiv(size, block_o))](
                h, lora_b, starts, lens, seg_slots, ranks, yv, size, i * r, h.stride(0), lora_b.stride(0),
                lora_b.stride(1), yv.stride(0), BLOCK_M=block_m, BLOCK_OUT=block_o, BLOCK_R=block_r, **dot)


def _disjoint(segments) -> list[list]:
    """Split segments into groups whose token ranges do not overlap (a mixture's chunk appears once per adapter)."""
    groups: list[list] = []
    for seg in segments:
        for g in groups:
            if all(seg.end <= o.start or o.end <= seg.start for o in g):
                g.append(seg)
                break
        else:
            groups.append([seg])
    return groups
