"""Per-step LoRA metadata handed to the model (built by the model runner)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class XLoRAGroup:
    """Tokens of one X-LoRA this step: ``rows: [Tx]`` their positions on the step's token axis, ``slots: [E]`` the
    experts' device slots, ``weights: [Tx, L, 7, E]`` each token's weight per (layer, module, expert)."""

    rows: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor


@dataclass
class LoRABatch:
    """Which adapter each token uses this step.

    Decode tokens (the first ``num_decodes`` of the step) go through BGMV: ``slots: [num_decodes, K]`` device slot
    per token (the zero slot for base rows) and ``weights: [num_decodes, K]`` (None = all ones; K = 1 today, a
    weighted mixture is K > 1). Prefill chunks go through SGMV: ``segments`` lists ``(start, end, slot, weight)``
    token ranges that share one adapter (a mixture's chunk appears once per adapter); base-model chunks are absent.
    """

    num_decodes: int
    slots: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    segments: list[tuple[int, int, int, float]] = field(default_factory=list)
    # Set instead of per-token BGMV when few distinct adapters serve many decode tokens (see ops.dense_lora):
    unique_slots: torch.Tensor | None = None  # [D]
    unique_index: torch.Tensor | None = None  # [num_decodes] position of each token's slot in unique_slots
    unique_weights: torch.Tensor | None = None  # [num_decodes, D] mixtures: each token's weight on each used slot
    used_slots: frozenset[int] = frozenset()  # adapter slots anywhere in the step
    xlora: list[XLoRAGroup] = field(default_factory=list)  # per-token gated experts (any row, decode or prefill)
