"""RMSNorm, computed in fp32 and cast back (the reference implementations' order of operations)."""
from __future__ import annotations

import torch
from torch import nn

from loraplex import ops


class RMSNorm(nn.Module):
    """``y = weight * (x / sqrt(mean(x^2) + eps))`` with the normalisation in fp32."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: aten's rms_norm accumulates in fp32 and rounds once to x.dtype — bit-identical to the reference
        # formula ``(x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)``; the weight multiplies after
        # (``ops.add_rms_norm``: its torch form, or the C kernel that rounds the same).
        if x.dim() == 2:
            return ops.add_rms_norm(x, None, self.weight, self.eps)[1]
        # q/k norms over [T, heads, D]: the same kernel over T * heads rows (what the fused decode step runs)
        return ops.add_rms_norm(x.reshape(-1, x.shape[-1]), None, self.weight, self.eps)[1].view(x.shape)

    def add_forward(self, h: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream ``h + delta`` (``h`` when ``delta`` is None) and this norm of it, fused on the CPU."""
        return ops.add_rms_norm(h, delta, self.weight, self.eps)
