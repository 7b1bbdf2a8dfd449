"""Base linears with int8 / int4 weights (weight-only quantization); LoRA stacks still add on top of their output."""
from __future__ import annotations

import torch
from torch import nn

from loraplex.ops.quant import C_PATHS, int4_linear, int8_linear


class QuantLinear(nn.Module):
    """What every weight-only quantized linear shares: a frozen optional bias, the shape, and ``plan`` — a list of
    ``(max_batch, path)`` (ascending; the last entry covers every larger batch) saying which ``ops.quant`` path
    serves a batch of M rows."""

    def __init__(self, shape: tuple[int, int], bias: torch.Tensor | None, plan: list[tuple[int, str]]) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.plan = plan

    def path_for(self, m: int) -> str:
        return next((p for limit, p in self.plan if m <= limit), self.plan[-1][1])

    def c_gemv_for(self, m: int) -> bool:
        """Does a step of ``m`` rows take one of the C GEMV's forms (the fused decode step can take it then)?"""
        return self.path_for(m) in C_PATHS

    def tiled_steps(self, max_rows: int) -> int:
        """A bit mask: bit ``m - 1`` set where a step of ``m ≤ max_rows`` rows takes the C GEMV's tiled form."""
        return sum(1 << (m - 1) for m in range(1, max_rows + 1) if self.path_for(m).endswith("_tiled"))


class Int8Linear(QuantLinear):
    """Drop-in for a frozen ``nn.Linear``: ``Wq`` int8 ``[out, in]``, per-row fp32 scales (``ops.quant.quantize_int8``;
    built by ``models.quant_load``)."""

    def __init__(self, wq: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 plan: list[tuple[int, str]]) -> None:
        super().__init__(tuple(wq.shape), bias, plan)
        self.register_buffer("wq", wq)
        self.register_buffer("scales", scales)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of the dequantized weight (an embedding table quantized per row): ``Wq[ids] · s[ids]``."""
        return self.wq[ids].to(dtype) * self.scales[ids].to(dtype).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.wq, self.scales, self.bias, self.path_for(x.shape[0]))


class Int4Linear(QuantLinear):
    """Drop-in for a frozen ``nn.Linear`` with group-wise int4 weights: ``packed [out, in / 2]`` uint8 and ``so [out,
    in / group, 2]`` fp32 scale/offset pairs in the 16-row panel layout of ``ops.quant.pack_int4`` (groups of 32 hold
    GGUF's Q4 blocks); CPU."""

    def __init__(self, packed: torch.Tensor, so: torch.Tensor, group: int, bias: torch.Tensor | None,
                 plan: list[tuple[int, str]]) -> None:
        super().__init__((packed.shape[0], packed.shape[1] * 2), bias, plan)
        self.register_buffer("packed", packed)
        self.register_buffer("so", so)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.packed, self.so, self.group, self.bias, self.path_for(x.shape[0]))
