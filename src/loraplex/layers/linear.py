"""The decoder's dense projections: a frozen ``nn.Linear`` whose forward goes through ``ops.linear`` (small CPU
steps by the C GEMV)."""
from __future__ import annotations

import torch
from torch import nn

from loraplex import ops


class Linear(nn.Linear):
    """``y = x @ weight.T + bias`` with frozen parameters; the kernel is ``ops.linear``'s choice."""

    def __init__(self, n_in: int, n_out: int, bias: bool, dtype: torch.dtype, device) -> None:
        super().__init__(n_in, n_out, bias=bias, dtype=dtype, device=device)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)
