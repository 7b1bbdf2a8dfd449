"""Weight-only int8 linears: per-output-channel symmetric int8 weights, activations in a float dtype.

Semantics (the reference): ``y = x @ (Wq · s[:, None]).T + b`` with ``Wq: [out, in]`` int8 and ``s: [out]``.
Paths, chosen per batch size by measurement (``engine.quant_plan``): ``int8mm`` — PyTorch's weight-only kernel
(``torch._weight_int8pack_mm``) with activations in their own dtype; ``int8mm_bf16`` — the same kernel fed bf16
activations (on CPUs where its fp32 variant is slow); ``dequant`` — the weights expanded to the activations' dtype,
then one GEMM (the fast form for large batches: the int8 kernel is a GEMV at heart).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_PATHS = ("int8mm", "int8mm_bf16", "dequant")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w: [out, in]`` → (``Wq`` int8, ``s`` fp32 ``[out]``): ``s = max|w_row| / 127``, ``Wq = round(w / s)``."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def int8_linear(x: torch.Tensor, wq: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                path: str) -> torch.Tensor:
    """``x: [M, in]`` → ``[M, out]`` in ``x.dtype`` by ``path`` (see the module docstring)."""
    if path == "dequant":
        return F.linear(x, wq.to(x.dtype) * scales.to(x.dtype)[:, None], bias)
    act = torch.bfloat16 if path == "int8mm_bf16" else x.dtype
    y = torch._weight_int8pack_mm(x.to(act).contiguous(), wq, scales.to(act)).to(x.dtype)
    return y if bias is None else y + bias


def int8_linear_reference(x: torch.Tensor, wq: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """The semantics in fp32 (tests)."""
    y = F.linear(x.float(), wq.float() * scales.float()[:, None], None if bias is None else bias.float())
    return y.to(x.dtype)
