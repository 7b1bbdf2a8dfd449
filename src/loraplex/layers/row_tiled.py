"""A linear layer run on fixed row tiles (``--deterministic``): see ``ops.batch_invariant``."""
from __future__ import annotations

import torch
from torch import nn

from loraplex import ops


class RowTiled(nn.Module):
    """``inner(x)`` computed on zero-padded tiles of ``tile`` rows: the same GEMM shape for every token, so each
    token's output does not depend on how many tokens share the step. Wraps a plain or quantized linear."""

    def __init__(self, inner: nn.Module, tile: int) -> None:
        super().__init__()
        self.inner = inner
        self.tile = tile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.row_tiled(self.inner, x, self.tile)
