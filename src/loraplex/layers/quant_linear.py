"""A base linear with int8 weights (weight-only quantization); LoRA stacks still add on top of its output."""
from __future__ import annotations

import torch
from torch import nn

from loraplex.ops.quant import int8_linear, quantize_int8


class Int8Linear(nn.Module):
    """Drop-in for a frozen ``nn.Linear``: ``Wq`` int8 ``[out, in]``, per-row scales, optional bias. ``plan`` is a
    list of ``(max_batch, path)`` (ascending; the last entry covers every larger batch) saying which
    ``ops.quant`` path serves a batch of M rows."""

    def __init__(self, wq: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 plan: list[tuple[int, str]]) -> None:
        super().__init__()
        self.register_buffer("wq", wq)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.plan = plan
        self.in_features, self.out_features = wq.shape[1], wq.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, plan: list[tuple[int, str]]) -> "Int8Linear":
        wq, scales = quantize_int8(linear.weight.data)
        bias = None if linear.bias is None else linear.bias.data
        return cls(wq.to(linear.weight.device), scales.to(linear.weight.device), bias, plan)

    def path_for(self, m: int) -> str:
        return next((p for limit, p in self.plan if m <= limit), self.plan[-1][1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.wq, self.scales, self.bias, self.path_for(x.shape[0]))
