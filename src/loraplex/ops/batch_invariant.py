"""Batch-invariant forms of the row-wise ops (``--deterministic``): a token's result does not depend on what else
shares its step.

A CPU GEMM picks its kernel — and with it the order in which each dot product is summed — from the number of rows
``M`` (MKL's fp32 GEMV for ``M = 1`` and GEMM blockings beyond; ATen's GEMV vs oneDNN in bf16), so the same token
rounds differently alone and in a batch, and greedy streams drift apart. Here every token-row GEMM runs on row tiles
of one fixed size ``tile`` (zero-padded): the kernel, its blocking and its summation order are the same for every
row whatever the batch. Each row of a GEMM is independent of the other rows of its tile, so its bits depend only
on its own inputs.

Semantics (each op equals its plain form up to rounding; the tests check both that and bitwise invariance):
- ``row_tiled(fn, x, tile) = fn(x)`` for a row-wise ``fn``, computed as ``cat(fn(x_pad[i:i + tile]))[:T]``.
- ``add_lora_grouped``: ``y[t] += Σ_k w[t, k] · (x[t] @ A[s].T) @ B[s].T`` with ``s = slot of pair k``, the pairs
  added one after another in the request's order, each adapter's tokens gathered into row tiles.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from loraplex.ops.lora_batch import TokenGroup
from loraplex.ops.lora_torch import narrow_ranks


def row_tiled(fn: Callable[..., torch.Tensor], x: torch.Tensor, tile: int, *rows_of: torch.Tensor) -> torch.Tensor:
    """``fn(x, *rows_of)`` for a row-wise ``fn`` (``[tile, ...] -> [tile, ...]``), evaluated on zero-padded row tiles
    of size ``tile`` so each row's bits do not depend on how many rows ``x`` has (``x: [T, ...]``; ``rows_of``:
    more per-row inputs, tiled alongside)."""
    t = x.shape[0]
    pad = -t % tile
    xs = [x, *rows_of]
    if pad:
        xs = [torch.cat([v, v.new_zeros(pad, *v.shape[1:])]) for v in xs]
    out = [fn(*(v[i:i + tile] for v in xs)) for i in range(0, t + pad, tile)]
    return (out[0] if len(out) == 1 else torch.cat(out))[:t]


def add_lora_grouped(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bs: list[torch.Tensor],
                     out_slices: list[tuple[int, int]], groups: tuple[TokenGroup, ...], tile: int,
                     rank_of: Sequence[int] | None = None) -> None:
    """LoRA for tokens gathered by adapter (``groups``, in the order their deltas are added): per group
    ``y[rows, slice_i] += w · (x[rows] @ A[slot].T)_i @ B_i[slot].T`` with both GEMMs on fixed row tiles, each at
    the adapter's own rank (``rank_of``), so neither the other adapters nor the buffers' width change its bits."""
    for g in groups:
        a_all, bs = (lora_a, lora_bs) if rank_of is None else narrow_ranks(lora_a, lora_bs, rank_of[g.slot])
        r = bs[0].shape[-1]
        if r == 0:  # the adapter does not target this projection
            continue
        a = a_all[g.slot].reshape(-1, lora_a.shape[-1])  # [n_slices · r, in]
        h = row_tiled(lambda xt: xt @ a.T, x.index_select(0, g.rows), tile)  # [n, n_slices · r]
        if g.weights is not None:
            h = h * g.weights.unsqueeze(-1).to(h.dtype)
        for i, ((start, size), lora_b) in enumerate(zip(out_slices, bs)):
            b = lora_b[g.slot].contiguous()  # [size, r]
            delta = row_tiled(lambda ht: ht @ b.T, h[:, i * r:(i + 1) * r].contiguous(), tile)
            y[:, start:start + size].index_add_(0, g.rows, delta)
