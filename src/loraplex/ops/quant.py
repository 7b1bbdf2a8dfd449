"""Weight-only quantized linears, activations in a float dtype.

int8, per output channel (the reference): ``y = x @ (Wq · s[:, None]).T + b`` with ``Wq: [out, in]`` int8, ``s: [out]``.
int4, per group of ``g`` input columns (tinygemm's format): ``W[o, i] = (q[o, i] - 8) · scale[i // g, o] + zero[i // g, o]``
with ``q`` in 0..15; packed by ``torch._convert_weight_to_int4pack_for_cpu`` (CPU only for now).
Paths, chosen per batch size by measurement (``engine.quant_plan``): ``int8mm`` — PyTorch's weight-only kernel
(``torch._weight_int8pack_mm``) with activations in their own dtype; ``int8mm_bf16`` — the same kernel fed bf16
activations (on CPUs where its fp32 variant is slow); ``dequant`` — the weights expanded to the activations' dtype,
then one GEMM (the fast form for large batches: the int8 kernel is a GEMV at heart); ``int8_c`` — the C GEMV
(``ops.dense_cpu.gemv_int8``, steps of at most ``GEMV_MAX_ROWS`` rows), the int8 weights widened in registers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex.ops import dense_cpu

INT8_PATHS = ("int8mm", "int8mm_bf16", "dequant", "int8_c")
INT4_PATHS = ("int4mm", "int4mm_bf16")  # int4 keeps only the packed weights: no dequantized form


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
    if path == "int8_c" and x.shape[0] <= dense_cpu.GEMV_MAX_ROWS:
        return dense_cpu.gemv_int8(x, wq, scales, bias)
    if path == "int8_c":  # a larger step than the C GEMV takes (the plan measured none): the int8 kernel
        path = "int8mm"
    act = torch.bfloat16 if path == "int8mm_bf16" else x.dtype
    y = torch._weight_int8pack_mm(x.to(act).contiguous(), wq, scales.to(act)).to(x.dtype)
    return y if bias is None else y + bias


def int8_linear_reference(x: torch.Tensor, wq: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """The semantics in fp32 (tests)."""
    y = F.linear(x.float(), wq.float() * scales.float()[:, None], None if bias is None else bias.float())
    return y.to(x.dtype)


def int4_group_size(n_in: int, wanted: int) -> int:
    """``wanted`` if it divides the input width, else the largest of 128 / 64 / 32 that does."""
    for g in (wanted, 128, 64, 32):
        if n_in % g == 0:
            return g
    raise ValueError(f"quantization: int4 needs an input width divisible by 32, got {n_in}")


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w: [out, in]`` → (``q`` int32 ``[out, in]`` in 0..15, ``scales_zeros`` fp32 ``[in / g, out, 2]``):
    asymmetric per group, ``scale = (max - min) / 15``, ``zero = min + 8 · scale``."""
    n_out, n_in = w.shape
    wg = w.float().view(n_out, n_in // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.clamp(torch.round((wg - lo) / scale), 0, 15).to(torch.int32).view(n_out, n_in)
    zero = lo + 8 * scale
    return q, torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], dim=-1).contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(q, 1)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, group: int, scales_zeros: torch.Tensor,
                bias: torch.Tensor | None, path: str) -> torch.Tensor:
    act = torch.bfloat16 if path == "int4mm_bf16" else x.dtype
    y = torch._weight_int4pack_mm_for_cpu(x.to(act).contiguous(), packed, group, scales_zeros.to(act)).to(x.dtype)
    return y if bias is None else y + bias


def int4_linear_reference(x: torch.Tensor, q: torch.Tensor, group: int, scales_zeros: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """The int4 semantics in fp32 (tests)."""
    n_out, n_in = q.shape
    scale, zero = scales_zeros[..., 0].t().unsqueeze(-1), scales_zeros[..., 1].t().unsqueeze(-1)  # [out, in/g, 1]
    w = ((q.view(n_out, n_in // group, group).float() - 8) * scale + zero).view(n_out, n_in)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
