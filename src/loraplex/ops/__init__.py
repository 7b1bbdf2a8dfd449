"""One dispatch point for kernels. Layers call ``add_lora``; it dispatches on the step's :class:`LoRABatch` forms:
CUDA tensors take the Triton kernels (``lora_triton``) for BGMV and SGMV when Triton is importable; CPU BGMV steps
the C kernel (``lora_cpu``) when it is built; everything else the torch implementations (``lora_torch``, each beside
its reference). The dense ops (``linear``, ``add_rms_norm``, ``rope_``, ``silu_mul``) take the C kernels of
``dense_cpu`` on CPU tensors where they are built (``linear`` only for steps of at most ``cpu_gemv`` rows), else
their torch forms."""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from loraplex.ops import attention_cpu, decode_step_cpu, dense_cpu, lora_cpu
from loraplex.ops.batch_invariant import add_lora_grouped, row_tiled
from loraplex.ops.lora_batch import Bgmv, Dense, DenseWeighted, LoRABatch, Segment, TokenGroup, XLoRAGroup
from loraplex.ops.lora_torch import (
    bgmv_expand,
    bgmv_shrink,
    dense_lora,
    dense_lora_gated,
    dense_lora_weighted,
    narrow_ranks,
)

__all__ = ["Bgmv", "Dense", "DenseWeighted", "LoRABatch", "Segment", "TokenGroup", "XLoRAGroup", "add_lora",
           "add_lora_gated", "add_rms_norm", "build_cpu_kernels", "cpu_bgmv_serves", "cpu_gemv", "gemv_rows",
           "linear", "rope_", "row_tiled", "silu_mul", "use_triton"]

_gemv_rows = 0  # CPU linears of at most this many rows take the C GEMV (set per step by ``cpu_gemv``)


@contextmanager
def cpu_gemv(max_rows: int) -> Iterator[None]:
    """Inside the block, ``linear`` on CPU tensors of at most ``max_rows`` rows (≤ ``dense_cpu.GEMV_MAX_ROWS``)
    takes the C GEMV; 0 = never (the default: the engine sets what it measured, ``engine.kernel_choice``)."""
    global _gemv_rows
    prev, _gemv_rows = _gemv_rows, min(max_rows, dense_cpu.GEMV_MAX_ROWS)
    try:
        yield
    finally:
        _gemv_rows = prev


def gemv_rows() -> int:
    """The most rows a CPU linear takes the C GEMV for, in the current ``cpu_gemv`` block (0 outside)."""
    return _gemv_rows


def build_cpu_kernels(dtype: torch.dtype) -> bool:
    """Build (or load from the cache) every C kernel library for CPU tensors of ``dtype``; whether all serve."""
    probe = torch.zeros(1, dtype=dtype)
    return all([m.available(probe) for m in (dense_cpu, attention_cpu, lora_cpu, decode_step_cpu)])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for the model's dense layers: ``[M, in]`` → ``[M, out]``; small CPU steps by the C GEMV."""
    if x.shape[0] <= _gemv_rows and dense_cpu.gemv_serves(x, weight, bias):
        return dense_cpu.gemv(x, weight, bias, checked=True)
    return F.linear(x, weight, bias)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream ``h + delta`` and its RMSNorm (``dense_cpu.add_rms_norm_reference``), in one C pass on
    the CPU."""
    if h.dim() == 2 and dense_cpu.available(h) and weight.dtype == h.dtype and h.stride(-1) == 1 \
            and (delta is None or (delta.dtype == h.dtype and delta.stride(-1) == 1)):
        return dense_cpu.add_rms_norm(h, delta, weight, eps)
    return dense_cpu.add_rms_norm_reference(h, delta, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` from the stacked ``[T, 2 I]`` gate|up output (``dense_cpu.silu_mul_reference``),
    one C pass on the CPU."""
    if gate_up.dim() == 2 and dense_cpu.available(gate_up) and gate_up.stride(-1) == 1:
        return dense_cpu.silu_mul(gate_up)
    return dense_cpu.silu_mul_reference(gate_up)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x: [T, H, D]`` by per-token tables ``[T, 1, D]`` (``dense_cpu.rope_reference``): in place by the C
    kernel on the CPU (returns ``x``), else a new tensor."""
    if dense_cpu.available(x) and x.stride(2) == 1 and x.stride(1) == x.shape[2] and cos.dtype == x.dtype:
        return dense_cpu.rope_(x, cos, sin_signed)
    return dense_cpu.rope_reference(x, cos, sin_signed)


def add_lora_bgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bs: list[torch.Tensor],
                  out_slices: list[tuple[int, int]], slots: torch.Tensor, weights: torch.Tensor | None) -> None:
    """LoRA on a (possibly stacked) linear: ``y[:, slice_i] += Σ_k w · B_i[s] (A_i[s] x)`` for each output slice.

    ``lora_a: [S, n_slices · r, in]`` holds the slices' A matrices stacked (one shrink for all of them);
    ``lora_bs[i]: [S, size_i, r]``. See ``ops.lora_torch`` for the exact semantics and shapes.
    """
    h = bgmv_shrink(x, lora_a, slots, weights)  # [T, K, n_slices · r]
    r = lora_bs[0].shape[-1]
    for i, ((start, size), lora_b) in enumerate(zip(out_slices, lora_bs)):
        bgmv_expand(y.narrow(-1, start, size), h[..., i * r:(i + 1) * r], lora_b, slots)


# LORAPLEX_TRITON=1: CPU tensors take the Triton kernels too — under TRITON_INTERPRET=1, how CI runs whole models
# through them without a GPU
TRITON_ON_CPU = os.environ.get("LORAPLEX_TRITON") == "1"


@functools.cache
def _triton():
    """The Triton kernels module, or None where Triton is not installed."""
    try:
        from loraplex.ops import lora_triton
    except ImportError:
        return None
    return lora_triton


def use_triton(device: torch.device) -> bool:
    """Do tensors on ``device`` take the Triton kernels (CUDA, or CPU with ``LORAPLEX_TRITON=1``; Triton installed)?"""
    return (device.type == "cuda" or TRITON_ON_CPU) and _triton() is not None


def cpu_bgmv_serves(buffer: torch.Tensor) -> bool:
    """Will BGMV steps over LoRA buffers like ``buffer`` take the C kernel (CPU, its dtype supported, the kernel
    built, Triton not asked for)? Then ``LoRAStack`` stores its B buffers transposed for it."""
    return not use_triton(buffer.device) and lora_cpu.available(buffer)


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bs: list[torch.Tensor],
             out_slices: list[tuple[int, int]], batch: LoRABatch, ranks: torch.Tensor | None = None,
             rank_of: Sequence[int] | None = None, lora_bts: list[torch.Tensor] | None = None) -> None:
    """Apply a step's LoRA: decode tokens by BGMV (gather per token) or, when few distinct adapters serve many
    tokens, by the dense form that reads each adapter once; one SGMV matmul pair per prefill segment. ``ranks``
    (``[S]`` int32, each slot's true rank) lets the Triton kernels skip the zero padding up to the max rank;
    ``rank_of`` (the same, as ints) lets the torch forms do the same: each segment and token group at its own
    rank, the decodes at the largest rank among the step's slots. ``lora_bts``: the B buffers transposed
    (``cpu_bgmv_serves``), with ``ranks`` what the C BGMV kernel reads in place.
    A batch-invariant step (``batch.row_tile``) takes its token groups through ``ops.batch_invariant``."""
    if batch.row_tile:
        add_lora_grouped(y, x, lora_a, lora_bs, out_slices, batch.groups, batch.row_tile, rank_of)
        return
    nd = batch.num_decodes
    fast = _triton() if use_triton(x.device) else None
    seg_a, seg_bs = lora_a, lora_bs
    in_place = lora_bts is not None and ranks is not None and isinstance(batch.decodes, Bgmv)  # the C kernel
    if fast is None and not in_place and rank_of is not None and batch.decodes is not None:
        lora_a, lora_bs = narrow_ranks(lora_a, lora_bs, max(rank_of[s] for s in batch.used_slots))
    match batch.decodes:
        case Bgmv(slots, weights) if fast is not None:
            fast.add_lora_bgmv_triton(y[:nd], x[:nd], lora_a, lora_bs, out_slices, slots, weights, ranks)
        case Bgmv(slots, weights) if in_place:
            lora_cpu.add_lora_bgmv_cpu(y[:nd], x[:nd], seg_a, lora_bts, out_slices, slots, weights, ranks)
        case Bgmv(slots, None) if rank_of is not None and slots.shape[1] == 1:
            _bgmv_by_rank(y[:nd], x[:nd], seg_a, seg_bs, out_slices, slots, rank_of)
        case Bgmv(slots, weights):
            add_lora_bgmv(y[:nd], x[:nd], lora_a, lora_bs, out_slices, slots, weights)
        case Dense(slots, index):
            dense_lora(y[:nd], x[:nd], lora_a, lora_bs, out_slices, slots, index)
        case DenseWeighted(slots, weights):
            dense_lora_weighted(y[:nd], x[:nd], lora_a, lora_bs, out_slices, slots, weights)
        case None:
            pass
    if fast is not None and batch.segments:
        fast.add_lora_segments_triton(y, x, lora_a, lora_bs, out_slices, batch.segments, ranks)
        return
    for start, end, slot, weight in batch.segments:
        a, bs = (seg_a, seg_bs) if rank_of is None else narrow_ranks(seg_a, seg_bs, rank_of[slot])
        if bs[0].shape[-1]:  # rank 0 here: the adapter does not target this projection
            add_lora_segment(y[start:end], x[start:end], a, bs, out_slices, slot, weight)


def _bgmv_by_rank(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bs: list[torch.Tensor],
                  out_slices: list[tuple[int, int]], slots: torch.Tensor, rank_of: Sequence[int]) -> None:
    """BGMV with the decode tokens split by their adapter's rank: each group gathers only its true rank (a step
    mixing ranks 8, 16 and 64 reads each adapter at its own rank, not all at 64)."""
    by_rank: dict[int, list[int]] = {}
    for t, s in enumerate(slots[:, 0].tolist()):
        by_rank.setdefault(rank_of[s], []).append(t)
    if len(by_rank) == 1:
        a, bs = narrow_ranks(lora_a, lora_bs, next(iter(by_rank)))
        add_lora_bgmv(y, x, a, bs, out_slices, slots, None)
        return
    for r, rows in by_rank.items():
        if r == 0:  # base rows, or adapters that skip this projection
            continue
        idx = torch.tensor(rows, device=x.device)
        a, bs = narrow_ranks(lora_a, lora_bs, r)
        part = y.new_zeros(len(rows), y.shape[1])
        add_lora_bgmv(part, x.index_select(0, idx), a, bs, out_slices, slots.index_select(0, idx), None)
        y.index_add_(0, idx, part)


def add_lora_segment(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bs: list[torch.Tensor],
                     out_slices: list[tuple[int, int]], slot: int, weight: float = 1.0) -> None:
    """SGMV for one segment of tokens sharing ``slot``: ``y[:, slice_i] += w · (x @ A[slot].T)_i @ B_i[slot].T``."""
    r = lora_bs[0].shape[-1]
    h = x @ lora_a[slot].reshape(-1, lora_a.shape[-1]).T  # [n, n_slices · r]
    if weight != 1.0:
        h = h * weight
    for i, ((start, size), lora_b) in enumerate(zip(out_slices, lora_bs)):
        y[:, start:start + size] += h[:, i * r:(i + 1) * r] @ lora_b[slot].T


def add_lora_gated(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bs: list[torch.Tensor],
                   out_slices: list[tuple[int, int]], group: XLoRAGroup, weights: torch.Tensor,
                   row_tile: int = 0, rank_of: Sequence[int] | None = None) -> None:
    """X-LoRA: tokens ``group.rows`` get ``Σ_e weights[t, i, e] · B_i[s_e] A_i[s_e] x`` on output slice i, with
    ``s_e = group.slots[e]`` (a per-token, per-slice mixture of the E experts; ``weights: [Tx, n_slices, E]`` is
    the group's weights at this stack's layer and modules). ``row_tile`` > 0: on fixed row tiles (batch-invariant);
    ``rank_of``: the experts' true ranks (then computed at the largest of them, whatever else is loaded)."""
    rows = group.rows
    if rank_of is not None:
        lora_a, lora_bs = narrow_ranks(lora_a, lora_bs, max(rank_of[s] for s in group.slots.tolist()))

    def gated(xs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [n, in], [n, n_slices, E] -> [n, out]
        out = y.new_zeros(xs.shape[0], y.shape[1])
        dense_lora_gated(out, xs, lora_a, lora_bs, out_slices, group.slots, w)
        return out

    xs = x.index_select(0, rows)
    out = row_tiled(gated, xs, row_tile, weights) if row_tile else gated(xs, weights)
    y.index_add_(0, rows, out)
