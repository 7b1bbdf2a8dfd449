"""Weight-only quantized linears, activations in a float dtype.

int8, per output channel (the reference): ``y = x @ (Wq · s[:, None]).T + b`` with ``Wq: [out, in]`` int8, ``s: [out]``.
int4, per group of ``g`` input columns: ``W[o, i] = q[o, i] · scale[o, i // g] + offset[o, i // g]`` with ``q`` in
0..15 packed two to a byte in our 16-row panel layout (``pack_int4``) and ``(scale, offset)`` pairs, fp16 where all
are exact in it (our quantizer rounds them so; GGUF's Q4_0 / Q4_1), else fp32 (GGUF's Q4_K sub-block scales
``d · sc``, which fp16 would not keep exactly) (CPU only).
Paths, chosen per batch size by measurement (``engine.quant_plan``): ``int8mm`` — PyTorch's weight-only kernel
(``torch._weight_int8pack_mm``) with activations in their own dtype; ``int8mm_bf16`` — the same kernel fed bf16
activations (on CPUs where its fp32 variant is slow); ``dequant`` — the weights expanded to the activations' dtype,
then one GEMM (the fast form for large batches: the int8 kernel is a GEMV at heart); ``int8_c`` — the C GEMV
(``ops.dense_cpu.gemv_int8``, steps of at most ``GEMV_MAX_ROWS`` rows), the int8 weights widened in registers;
``int8_tiled`` — the same C GEMV's tiled form (rows expanded into a scratch once per step, register tiles over the
tokens). int4's paths: ``int4_c`` (``ops.dense_cpu.gemv_int4``, every step size up to ``GEMV_MAX_ROWS``) and
``dequant`` (see ``int4_linear``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex import ops
from loraplex.ops import dense_cpu

INT8_PATHS = ("int8mm", "int8mm_bf16", "dequant", "int8_c", "int8_tiled")
INT4_PATHS = ("int4_c", "dequant")  # int4 keeps only the packed weights: "dequant" expands per call
C_PATHS = ("int8_c", "int8_tiled", "int4_c")  # the C GEMVs: steps of at most GEMV_MAX_ROWS rows


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w: [out, in]`` → (``Wq`` int8, ``s`` fp32 ``[out]``): ``s = max|w_row| / 127``, ``Wq = round(w / s)``."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def int8_linear(x: torch.Tensor, wq: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                path: str) -> torch.Tensor:
    """``x: [M, in]`` → ``[M, out]`` in ``x.dtype`` by ``path`` (see the module docstring)."""
    if path == "dequant":
        if not dense_cpu.available(x):
            return F.linear(x, wq.to(x.dtype) * scales.to(x.dtype)[:, None], bias)
        return _chunked(x, wq.shape[0], wq.shape[1], bias,
                        lambda at, buf: dense_cpu.dequant_int8(wq, scales, at, x.dtype, buf))
    if path in C_PATHS and x.shape[0] <= dense_cpu.GEMV_MAX_ROWS:
        return dense_cpu.gemv_int8(x, wq, scales, bias, tiled=path == "int8_tiled")
    if path in C_PATHS:  # a larger step than the C GEMV takes (the plan measured none): the int8 kernel
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
    """``w: [out, in]`` → (``q`` uint8 ``[out, in]`` in 0..15, ``so`` fp32 ``[out, in / group, 2]``): asymmetric per
    group, ``scale = (max - min) / 15`` and ``offset = min``, ``W ≈ q · scale + offset``. Where they fit fp16's normal
    range, scale and offset are rounded to fp16 values first (and q taken against them), so that ``pack_int4`` keeps
    them in 4 bytes a group, as GGUF's Q4_1 does."""
    n_out, n_in = w.shape
    wg = w.float().view(n_out, n_in // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    if lo.numel() and max(float(lo.abs().max()), float(scale.max())) < F16_MAX:
        lo, scale = lo.half().float(), scale.clamp(min=F16_TINY).half().float()
    q = torch.clamp(torch.round((wg - lo[..., None]) / scale[..., None]), 0, 15).to(torch.uint8).view(n_out, n_in)
    return q, scale_offset(scale, lo)


def scale_offset(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``[out, groups]`` scales and offsets → the fp32 pairs ``[out, groups, 2]`` the int4 kernels read."""
    return torch.stack([scale, offset], dim=-1).float().contiguous()


PANEL = 16  # int4 rows per panel (ops/dense_cpu.c INT4 PANEL LAYOUT)
F16_MAX, F16_TINY = 65504.0, 2.0 ** -14  # fp16's largest and smallest normal values
PACK_ELEMENTS = 1 << 18  # weights packed at a time (bounds pack_int4's int64 temporaries to a few MB)


def pack_int4(q: torch.Tensor, so: torch.Tensor, compact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``q: [out, in]`` in 0..15 and ``so: [out, in / g, 2]`` (row-major, as ``quantize_int4`` makes them) → the
    kernels' ``(packed [out, in / 2] uint8, so [out, in / g, 2])`` in the 16-row panel layout of
    ``ops/dense_cpu.c``: per panel, per octet of inputs, one little-endian 32-bit word per row with ``q[8o + 2j]`` in
    bits ``4j..4j+3`` and ``q[8o + 2j + 1]`` in bits ``16 + 4j..``; per panel and group the rows' scales, then their
    offsets. A panel's bytes are its rows' in the ``[out, …]`` views, so row ranges that start at a multiple of 16
    pack apart (the last panel holds the ``out % 16`` rows left). ``so`` comes back in fp16 where every pair is
    exact in it and ``compact`` (``half_if_exact``), else in fp32."""
    n_out, n_in = q.shape
    if n_in % 32:
        raise ValueError(f"quantization: int4 needs an input width divisible by 32, got {n_in}")
    if so.shape[0] != n_out or so.shape[-1] != 2 or n_in % so.shape[1]:
        raise ValueError(f"quantization: scale/offset pairs {tuple(so.shape)} do not fit q {tuple(q.shape)}")
    packed = torch.empty(n_out, n_in // 2, dtype=torch.uint8)
    so_out = torch.empty(so.shape, dtype=torch.float32)
    full, step = n_out // PANEL * PANEL, max(1, PACK_ELEMENTS // n_in // PANEL) * PANEL
    for lo in range(0, n_out, step):
        for a, b in ((lo, min(lo + step, full)), (max(lo, full), min(lo + step, n_out))):
            if a < b:
                packed[a:b], so_out[a:b] = _panels(q[a:b], so[a:b], min(PANEL, b - a))
    return packed, half_if_exact(so_out) if compact else so_out


def half_if_exact(so: torch.Tensor) -> torch.Tensor:
    """Scale/offset pairs in fp16 when every value is exact in it (4 bytes a group instead of 8), else in fp32."""
    half = so.half()
    return half if torch.equal(half.float(), so.float()) else so.float()


def _panels(q: torch.Tensor, so: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``q`` / ``so`` (a multiple of ``rows``) as panels of ``rows`` rows each."""
    n, k = q.shape
    w = q.to(torch.int64).view(n // rows, rows, k // 8, 4, 2)  # panel, row, octet, plane j, half
    shift = 4 * torch.arange(4)
    word = ((w[..., 0] << shift) | (w[..., 1] << (shift + 16))).sum(-1)  # disjoint bits: the sum is the OR
    word = torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)
    packed = word.permute(0, 2, 1).contiguous().view(torch.uint8).view(n, k // 2)
    groups = so.shape[1]
    so_p = so.float().reshape(n // rows, rows, groups, 2).permute(0, 2, 3, 1).reshape(n, groups, 2)
    return packed, so_p


def unpack_int4(packed: torch.Tensor, so: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_int4``: → (``q [out, in]`` uint8, ``so [out, in / g, 2]`` row-major)."""
    n_out, n_in = packed.shape[0], packed.shape[1] * 2
    q, so_rows = torch.empty(n_out, n_in, dtype=torch.uint8), torch.empty(so.shape, dtype=so.dtype)
    full = n_out // PANEL * PANEL
    for a, b in ((0, full), (full, n_out)):
        if a < b:
            rows, n, groups = min(PANEL, b - a), b - a, so.shape[1]
            word = packed[a:b].contiguous().view(torch.int32).view(n // rows, n_in // 8, rows).permute(0, 2, 1)
            shift = 4 * torch.arange(4)
            planes = torch.stack([(word[..., None] >> shift) & 15, (word[..., None] >> (shift + 16)) & 15], -1)
            q[a:b] = planes.reshape(n, n_in).to(torch.uint8)
            so_rows[a:b] = so[a:b].reshape(n // rows, groups, 2, rows).permute(0, 3, 1, 2).reshape(n, groups, 2)
    return q, so_rows


def dequantize_int4(q: torch.Tensor, so: torch.Tensor, group: int) -> torch.Tensor:
    """``W = q · scale + offset`` per group, in fp32 (``q`` unpacked)."""
    n_out, n_in = q.shape
    scale, offset = so[..., 0:1].float(), so[..., 1:2].float()
    return (q.view(n_out, n_in // group, group).float() * scale + offset).view(n_out, n_in)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor, group: int, bias: torch.Tensor | None,
                path: str) -> torch.Tensor:
    """``x: [M, in]`` → ``[M, out]`` in ``x.dtype`` by ``path``: ``int4_c`` the C GEMV (steps of at most
    ``GEMV_MAX_ROWS`` rows); ``dequant`` rows of the weight expanded to the activations' dtype (by C where built,
    else torch), a GEMM per chunk of rows. ``packed``, ``so``: from ``pack_int4``."""
    if path in C_PATHS and x.shape[0] <= dense_cpu.GEMV_MAX_ROWS and dense_cpu.available(x):
        return dense_cpu.gemv_int4(x, packed, so, group, bias)
    n_out = packed.shape[0]
    if not dense_cpu.available(x):  # elsewhere: the torch reference's weights
        return F.linear(x, dequantize_int4(*unpack_int4(packed, so), group).to(x.dtype), bias)
    return _chunked(x, n_out, packed.shape[1] * 2, bias,
                    lambda at, buf: dense_cpu.dequant_int4(packed, so, group, at, x.dtype, buf))


def _chunked(x: torch.Tensor, n_out: int, n_in: int, bias: torch.Tensor | None, expand) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` expanded to ``x.dtype`` a chunk of rows at a time by ``expand(rows, scratch)``
    (the dequant paths: a GEMM per cache-resident chunk, no full-precision copy of the weight)."""
    rows = min(n_out, max(1, DEQUANT_CHUNK // n_in))
    scratch = _scratch(rows * n_in, x.dtype).view(rows, n_in)
    if rows == n_out:  # ops.linear: the C GEMV for the step sizes it was measured to serve, else F.linear
        return ops.linear(x, expand((0, n_out), scratch), bias)
    y = x.new_empty(x.shape[0], n_out)
    for r in range(0, n_out, rows):
        at = (r, min(n_out, r + rows))
        y[:, at[0]:at[1]] = ops.linear(x, expand(at, scratch))
    return y if bias is None else y.add_(bias)


# weights expanded per GEMM of the dequant paths (4 MB of bf16: cache-resident, and GEMMs of 1k+ rows at a decoder's
# widths)
DEQUANT_CHUNK = 1 << 21
_SCRATCH: dict[torch.dtype, torch.Tensor] = {}  # the kept scratch per dtype (``_scratch``)


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer kept across calls (fresh pages for every expanded chunk would fault in on each call)."""
    buf = _SCRATCH.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def int4_linear_reference(x: torch.Tensor, q: torch.Tensor, so: torch.Tensor, group: int,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """The int4 semantics in fp32 (tests): ``x @ (q · scale + offset).T + bias`` per group."""
    return F.linear(x.float(), dequantize_int4(q, so, group), None if bias is None else bias.float()).to(x.dtype)
