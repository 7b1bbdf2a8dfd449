"""Per-step LoRA metadata handed to the model (built by the model runner)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    """``slots: [T, K]`` device slot per token (the zero slot for base rows); ``weights: [T, K]`` mixing weights.

    K = 1 today (one adapter per row, weight 1); a weighted mixture is K > 1 pairs per row.
    """

    slots: torch.Tensor
    weights: torch.Tensor
