"""LoRA shrink/expand in plain PyTorch: a per-token loop reference and the batched gather (BGMV) form.

Shapes: ``x: [T, in]``, ``lora_a: [S, r, in]``, ``lora_b: [S, out, r]``, ``slots: [T, K]`` (long; each token carries
K (slot, weight) pairs — K = 1 for a single adapter, K > 1 for a mixture), ``weights: [T, K]``.
Semantics: ``y[t] += Σ_k weights[t, k] · (x[t] @ lora_a[s].T) @ lora_b[s].T   where s = slots[t, k]``.
``lora_a`` may also be a ``[S, n, r, in]`` view (``narrow_ranks``: the first r rank rows of each stacked slice).
"""
from __future__ import annotations

import torch


def narrow_ranks(lora_a: torch.Tensor, lora_bs: list[torch.Tensor], r: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Views of the first ``r`` rank columns of every slot (no copy): ``lora_a [S, n·R, in] -> [S, n, r, in]``,
    ``lora_bs[i] [S, out, R] -> [S, out, r]``. The padding past a slot's true rank is zero, so an op over the views
    equals the op over the whole buffers when ``r`` is at least the rank of every slot it reads."""
    s, n_in = lora_a.shape[0], lora_a.shape[-1]
    n, width = len(lora_bs), lora_bs[0].shape[-1]
    if r >= width:
        return lora_a, lora_bs
    return lora_a.view(s, n, width, n_in)[:, :, :r], [b[:, :, :r] for b in lora_bs]


def add_lora_reference(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       slots: torch.Tensor, weights: torch.Tensor) -> None:
    """The semantics, one token and one pair at a time (tests only)."""
    for t in range(x.shape[0]):
        for k in range(slots.shape[1]):
            s = int(slots[t, k])
            y[t] += (weights[t, k] * ((x[t].float() @ lora_a[s].float().T) @ lora_b[s].float().T)).to(y.dtype)


def dense_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bs: list[torch.Tensor],
               out_slices: list[tuple[int, int]], unique: torch.Tensor, index: torch.Tensor) -> None:
    """BGMV semantics for few distinct adapters: read each of the D used slots once, as GEMMs.

    ``unique: [D]`` slots used by the step, ``index: [T]`` position of each token's slot in ``unique``;
    ``lora_a: [S, n · r, in]`` (n stacked slices), ``lora_bs[i]: [S, size_i, r]``. The shrink is one GEMM against
    all D adapters, after which each token keeps its own columns; each expand is one GEMM of that block-sparse
    ``[T, D·r]`` activation against the D adapters' B stacked as ``[D·r, out]`` (D = 1: plain GEMMs).
    """
    t, d = x.shape[0], unique.shape[0]
    r = lora_bs[0].shape[-1]
    a = lora_a.index_select(0, unique)  # [D, n·r, in] (or [D, n, r, in])
    h = x @ a.reshape(-1, a.shape[-1]).T  # [T, D·n·r]
    rows = torch.arange(t, device=x.device)
    if d > 1:
        h = h.view(t, d, -1)[rows, index]  # [T, n·r]: each token's own adapter
    for i, ((start, size), lora_b) in enumerate(zip(out_slices, lora_bs)):
        hi = h[:, i * r:(i + 1) * r]
        b = lora_b.index_select(0, unique)  # [D, out, r]
        if d == 1:
            y[:, start:start + size] += hi @ b[0].T
            continue
        sparse = torch.zeros(t, d, r, dtype=h.dtype, device=h.device)
        sparse[rows, index] = hi
        y[:, start:start + size] += sparse.view(t, d * r) @ b.transpose(1, 2).reshape(d * r, -1)


def dense_lora_weighted(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bs: list[torch.Tensor],
                        out_slices: list[tuple[int, int]], unique: torch.Tensor, weights: torch.Tensor) -> None:
    """The dense form for mixtures: ``weights: [T, D]`` is each token's weight on each of the D used slots (0 where
    it does not use it). Shrink against all D adapters at once, scale, then one expand GEMM per output slice."""
    t, d = x.shape[0], unique.shape[0]
    r = lora_bs[0].shape[-1]
    a = lora_a.index_select(0, unique)  # [D, n·r, in]
    h = (x @ a.reshape(-1, a.shape[-1]).T).view(t, d, -1) * weights.unsqueeze(-1).to(x.dtype)  # [T, D, n·r]
    for i, ((start, size), lora_b) in enumerate(zip(out_slices, lora_bs)):
        b = lora_b.index_select(0, unique).transpose(1, 2).reshape(d * r, -1)  # [D·r, out]
        y[:, start:start + size] += h[:, :, i * r:(i + 1) * r].reshape(t, d * r) @ b


def dense_lora_gated(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bs: list[torch.Tensor],
                     out_slices: list[tuple[int, int]], unique: torch.Tensor, weights: torch.Tensor) -> None:
    """The dense form with a weight per token, output slice and adapter (X-LoRA's gate): ``weights: [T, n, D]``
    for the n stacked slices and the D slots in ``unique``. Shrink against all D at once, scale each slice's
    columns, then one expand GEMM per slice."""
    t, d, n = x.shape[0], unique.shape[0], len(lora_bs)
    r = lora_bs[0].shape[-1]
    a = lora_a.index_select(0, unique)  # [D, n·r, in]
    h = (x @ a.reshape(-1, a.shape[-1]).T).view(t, d, n, r) * weights.transpose(1, 2).unsqueeze(-1).to(x.dtype)
    for i, ((start, size), lora_b) in enumerate(zip(out_slices, lora_bs)):
        b = lora_b.index_select(0, unique).transpose(1, 2).reshape(d * r, -1)  # [D·r, out]
        y[:, start:start + size] += h[:, :, i].reshape(t, d * r) @ b


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor,
                weights: torch.Tensor | None) -> torch.Tensor:
    """``h[t, k] = weights[t, k] · x[t] @ lora_a[slots[t, k]].T`` → ``[T, K, r]`` (``weights`` None = all ones)."""
    t, k = slots.shape
    n_in = lora_a.shape[-1]
    a = lora_a.index_select(0, slots.reshape(-1)).view(t * k, -1, n_in)  # [T·K, n·r, in]
    xs = x.unsqueeze(-1) if k == 1 else x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [T·K, in, 1]
    h = torch.bmm(a, xs).view(t, k, -1)
    return h if weights is None else h * weights.unsqueeze(-1).to(h.dtype)


def bgmv_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor) -> None:
    """``y[t] += Σ_k lora_b[slots[t, k]] @ h[t, k]`` for ``h: [T, K, r]``, in place."""
    t, k = slots.shape
    n_out, r = lora_b.shape[1], lora_b.shape[2]
    b = lora_b.index_select(0, slots.reshape(-1)).view(t * k, n_out, r)  # [T·K, out, r]
    out = torch.bmm(b, h.reshape(t * k, r, 1))  # [T·K, out, 1]
    y += out.view(t, n_out) if k == 1 else out.view(t, k, n_out).sum(dim=1)
