"""LoRA shrink/expand in plain PyTorch: a per-token loop reference and the batched gather (BGMV) form.

Shapes: ``x: [T, in]``, ``lora_a: [S, r, in]``, ``lora_b: [S, out, r]``, ``slots: [T, K]`` (long; each token carries
K (slot, weight) pairs — K = 1 for a single adapter, K > 1 for a mixture), ``weights: [T, K]``.
Semantics: ``y[t] += Σ_k weights[t, k] · (x[t] @ lora_a[s].T) @ lora_b[s].T   where s = slots[t, k]``.
"""
from __future__ import annotations

import torch


def add_lora_reference(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       slots: torch.Tensor, weights: torch.Tensor) -> None:
    """The semantics, one token and one pair at a time (tests only)."""
    for t in range(x.shape[0]):
        for k in range(slots.shape[1]):
            s = int(slots[t, k])
            y[t] += (weights[t, k] * ((x[t].float() @ lora_a[s].float().T) @ lora_b[s].float().T)).to(y.dtype)


def sgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slot: int) -> None:
    """One segment of tokens sharing adapter ``slot``: ``y += (x @ lora_a[slot].T) @ lora_b[slot].T``."""
    y += (x @ lora_a[slot].T) @ lora_b[slot].T


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``h[t, k] = weights[t, k] · x[t] @ lora_a[slots[t, k]].T`` → ``[T, K, r]``."""
    t, k = slots.shape
    a = lora_a.index_select(0, slots.reshape(-1)).view(t, k, lora_a.shape[1], lora_a.shape[2])  # [T, K, r, in]
    h = torch.matmul(a, x.view(t, 1, -1, 1)).squeeze(-1)  # [T, K, r]
    return h * weights.unsqueeze(-1).to(h.dtype)


def bgmv_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor) -> None:
    """``y[t] += Σ_k lora_b[slots[t, k]] @ h[t, k]`` for ``h: [T, K, r]``, in place."""
    t, k = slots.shape
    b = lora_b.index_select(0, slots.reshape(-1)).view(t, k, lora_b.shape[1], lora_b.shape[2])  # [T, K, out, r]
    y += torch.matmul(b, h.unsqueeze(-1)).squeeze(-1).sum(dim=1)
