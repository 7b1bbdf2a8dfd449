"""A decoder's small-step dense ops on the CPU as C kernels (``dense_cpu.c``), each beside its torch reference.

* ``gemv``: ``y = x @ W.T + b`` for steps of at most ``GEMV_MAX_ROWS`` tokens, each weight row read once for all of
  them (ATen and oneDNN run one token's GEMV at a fraction of the read bandwidth at a decoder's shapes);
* ``gemv_int8``: the same with weight-only int8 weights and per-row scales, in two forms: widened in registers, one
  pass over the weights per 8 tokens (small steps), or ``tiled`` — a few rows at a time expanded into a per-thread
  scratch in the compute dtype, then the dense register tiles over every token (larger steps); ``gemv_int4``: with
  group-wise int4 weights in our 16-row panel layout (``ops.quant.pack_int4``), 16 rows a vector, every step size;
  ``dequant_int4`` / ``dequant_int8`` expand rows for the prefill-sized GEMM;
* ``add_rms_norm``: the residual add and the next RMSNorm in one pass, rounding where the reference does;
* ``rope``: RoPE applied in place on the q|k heads, rounding where the reference does;
* ``silu_mul``: SwiGLU's ``silu(gate) * up`` from the stacked gate|up output in one pass.

Built at first use (``ops.cpu_ext``); where that fails ``available()`` is False and callers keep the references.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from loraplex.ops import cpu_ext

GEMV_MAX_ROWS = 64  # the most tokens one C GEMV call takes (more: prefill-sized GEMMs, oneDNN's job)
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
SO_DTYPES = {torch.float32: 0, torch.float16: 1}  # int4 scale/offset pairs: the C kernels' `half` flag
_P, _I, _F, _N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {"gemv": [_P, _I, _I, _P, _P, _P, _I, _I, _I, _N],
               "gemv_int8": [_P, _I, _I, _P, _P, _P, _P, _I, _I, _I, _I, _N],
               "gemv_int4": [_P, _I, _I, _P, _P, _I, _I, _P, _P, _I, _I, _I, _N],
               "dequant_int4": [_P, _P, _I, _I, _I, _I, _I, _I, _P, _N],
               "dequant_int8": [_P, _P, _I, _I, _I, _P, _N],
               "add_rms_norm": [_P, _I, _P, _I, _P, _P, _P, _I, _I, _F, _N],
               "rope": [_P, _I, _I, _I, _I, _P, _P, _N],
               "silu_mul": [_P, _I, _P, _I, _I, _N]}


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_ext.library("dense_cpu", "GEMV, RMSNorm and RoPE", exact=True)
    if lib is not None:
        for op, argtypes in _SIGNATURES.items():
            for suffix in DTYPES.values():
                fn = getattr(lib, f"{op}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
    return lib


def available(x: torch.Tensor) -> bool:
    """Do the C kernels serve tensors like ``x`` (CPU, fp32 or bf16, the library built)?"""
    return x.is_cpu and x.dtype in DTYPES and _library() is not None


def gemv_serves(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Can ``gemv`` take these tensors as laid out (rows of unit stride, contiguous weight and bias of x's dtype,
    at most ``GEMV_MAX_ROWS`` rows, the library built)?"""
    return x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and weight.dtype == x.dtype and available(x) \
        and x.stride(-1) == 1 and weight.is_contiguous() and weight.shape[1] == x.shape[1] \
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))


@functools.cache
def _fn(op: str, dtype: torch.dtype):
    return getattr(_library(), f"{op}_{DTYPES[dtype]}")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         checked: bool = False) -> torch.Tensor:
    """``x: [M, in]`` (M ≤ ``GEMV_MAX_ROWS``, unit stride along ``in``) → ``[M, out]``: ``x @ weight.T + bias``,
    fp32 accumulation, one rounding; ``weight: [out, in]`` contiguous. Reference: ``F.linear``. ``checked``: the
    caller has asked ``gemv_serves`` (``ops.linear``, once per call on the hot path)."""
    m, k = x.shape
    n = weight.shape[0]
    if not checked and not gemv_serves(x, weight, bias):
        raise ValueError(f"gemv: needs <= {GEMV_MAX_ROWS} rows of unit stride and contiguous weights of x's dtype, "
                         f"got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    y = x.new_empty(m, n)
    _fn("gemv", x.dtype)(x.data_ptr(), x.stride(0), m, weight.data_ptr(), None if bias is None else bias.data_ptr(),
                         y.data_ptr(), n, n, k, torch.get_num_threads())
    return y


def gemv_int8(x: torch.Tensor, wq: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None, tiled: bool = False) -> torch.Tensor:
    """``x: [M, in]`` (M ≤ ``GEMV_MAX_ROWS``) → ``[M, out]``: ``scales * (x @ wq.T) + bias`` with ``wq: [out, in]``
    int8 and ``scales: [out]`` fp32, fp32 accumulation, one rounding; ``tiled``: the tiled form. Reference:
    ``ops.quant.int8_linear_reference``."""
    m, k = x.shape
    n = wq.shape[0]
    if m > GEMV_MAX_ROWS or x.stride(-1) != 1 or not wq.is_contiguous() or wq.dtype != torch.int8 \
            or wq.shape[1] != k or scales.dtype != torch.float32 or not scales.is_contiguous() \
            or (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous())):
        raise ValueError(f"gemv_int8: needs <= {GEMV_MAX_ROWS} rows of unit stride, contiguous int8 weights and fp32 "
                         f"scales, got x {tuple(x.shape)}, weight {tuple(wq.shape)} {wq.dtype}")
    y = x.new_empty(m, n)
    _fn("gemv_int8", x.dtype)(x.data_ptr(), x.stride(0), m, wq.data_ptr(), scales.data_ptr(),
                              None if bias is None else bias.data_ptr(), y.data_ptr(), n, n, k, int(tiled),
                              torch.get_num_threads())
    return y


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, so: torch.Tensor, group: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x: [M, in]`` (M ≤ ``GEMV_MAX_ROWS``) → ``[M, out]``: ``x @ W.T + bias`` with ``W = q · scale + offset`` per
    group of ``group`` inputs (``packed: [out, in / 2]`` uint8 and ``so: [out, in / group, 2]`` fp32 or fp16
    scale/offset pairs, both from ``ops.quant.pack_int4``), fp32 accumulation, one rounding. Reference:
    ``ops.quant.int4_linear_reference``."""
    m, k = x.shape
    n = packed.shape[0]
    if m > GEMV_MAX_ROWS or x.stride(-1) != 1 or not packed.is_contiguous() or packed.dtype != torch.uint8 \
            or packed.shape[1] * 2 != k or so.dtype not in SO_DTYPES or not so.is_contiguous() \
            or so.shape != (n, k // group, 2) or (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous())):
        raise ValueError(f"gemv_int4: needs <= {GEMV_MAX_ROWS} rows of unit stride, packed uint8 weights and fp32 "
                         f"scale/offset pairs, got x {tuple(x.shape)}, weight {tuple(packed.shape)} {packed.dtype}")
    y = x.new_empty(m, n)
    _fn("gemv_int4", x.dtype)(x.data_ptr(), x.stride(0), m, packed.data_ptr(), so.data_ptr(), SO_DTYPES[so.dtype], group,
                              None if bias is None else bias.data_ptr(), y.data_ptr(), n, n, k, torch.get_num_threads())
    return y


def dequant_int4(packed: torch.Tensor, so: torch.Tensor, group: int, rows: tuple[int, int],
                 dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``rows[0]:rows[1]`` of the int4 weight (see ``gemv_int4``) as ``[rows, in]`` of ``dtype`` (into ``out``'s
    first rows when given: a contiguous scratch reused across calls), each weight rounded as the reference does.
    Reference: ``ops.quant.dequantize_int4``."""
    n0, n1 = rows
    k = packed.shape[1] * 2
    if out is None:
        out = torch.empty(n1 - n0, k, dtype=dtype)
    elif not out.is_contiguous() or out.dtype != dtype or out.shape[1] != k or out.shape[0] < n1 - n0:
        raise ValueError("dequant_int4: out must be contiguous, of the dtype and wide enough")
    out = out[:n1 - n0]
    if not (0 <= n0 <= n1 <= packed.shape[0]) or not packed.is_contiguous() or not so.is_contiguous() \
            or so.dtype not in SO_DTYPES:
        raise ValueError(f"dequant_int4: rows {rows} of a contiguous {packed.shape[0]}-row weight, fp32/fp16 pairs")
    _fn("dequant_int4", dtype)(packed.data_ptr(), so.data_ptr(), SO_DTYPES[so.dtype], group, n0, n1, packed.shape[0],
                               k, out.data_ptr(), torch.get_num_threads())
    return out


def dequant_int8(wq: torch.Tensor, scales: torch.Tensor, rows: tuple[int, int], dtype: torch.dtype,
                 out: torch.Tensor) -> torch.Tensor:
    """Rows ``rows[0]:rows[1]`` of an int8 weight (see ``gemv_int8``) as ``[rows, in]`` of ``dtype`` into ``out``'s
    first rows (a contiguous scratch), ``r(Wq · s)``. Reference: ``wq.float() * scales[:, None]`` rounded once."""
    n0, n1 = rows
    k = wq.shape[1]
    if not out.is_contiguous() or out.dtype != dtype or out.shape[1] != k or out.shape[0] < n1 - n0 \
            or not wq.is_contiguous() or wq.dtype != torch.int8 or scales.dtype != torch.float32:
        raise ValueError("dequant_int8: needs contiguous int8 weights, fp32 scales and a wide enough scratch")
    out = out[:n1 - n0]
    _fn("dequant_int8", dtype)(wq.data_ptr(), scales.data_ptr(), n0, n1, k, out.data_ptr(), torch.get_num_threads())
    return out


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h + delta, rms_norm(h + delta))`` for ``h, delta: [T, D]`` with unit stride along D (``delta`` None: ``h``
    itself); see ``add_rms_norm_reference``."""
    t, d = h.shape
    if h.stride(-1) != 1 or (delta is not None and (delta.stride(-1) != 1 or delta.shape != h.shape)):
        raise ValueError("add_rms_norm: needs rows of unit stride and matching shapes")
    out = h.new_empty(t, d)
    h_out = None if delta is None else h.new_empty(t, d)
    _fn("add_rms_norm", h.dtype)(h.data_ptr(), h.stride(0), None if delta is None else delta.data_ptr(),
                                 0 if delta is None else delta.stride(0), weight.data_ptr(),
                                 None if h_out is None else h_out.data_ptr(), out.data_ptr(), t, d, eps,
                                 torch.get_num_threads())
    return (h if h_out is None else h_out), out


def add_rms_norm_reference(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: ``h' = h + delta``; ``(h', weight * (h' / sqrt(mean(h'^2) + eps)))``, the normalisation in fp32
    rounded once to ``h.dtype``, then the weight's product (the reference models' order of operations)."""
    if delta is not None:
        h = h + delta
    return h, weight * F.rms_norm(h, weight.shape, eps=eps)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: [T, H, D]`` (heads contiguous within a token) in place by per-token tables ``[T, 1, D]``; see
    ``rope_reference``. Returns ``x``."""
    t, h, d = x.shape
    if x.stride(2) != 1 or x.stride(1) != d or cos.dtype != x.dtype or sin_signed.dtype != x.dtype:
        raise ValueError("rope_: needs contiguous heads and tables of x's dtype")
    cos, sin_signed = cos.reshape(t, d).contiguous(), sin_signed.reshape(t, d).contiguous()
    _fn("rope", x.dtype)(x.data_ptr(), x.stride(0), t, h, d, cos.data_ptr(), sin_signed.data_ptr(),
                         torch.get_num_threads())
    return x


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Semantics: ``x * cos + roll(x, D/2) * sin_signed`` (= ``x * cos + rotate_half(x) * sin``), a new tensor."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up: [T, 2 I]`` (rows of unit stride) → ``[T, I]``; see ``silu_mul_reference``."""
    t, two_i = gate_up.shape
    if gate_up.stride(-1) != 1 or two_i % 2:
        raise ValueError("silu_mul: needs rows of unit stride and an even width")
    out = gate_up.new_empty(t, two_i // 2)
    _fn("silu_mul", gate_up.dtype)(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), t, two_i // 2,
                                   torch.get_num_threads())
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Semantics: ``gate, up = gate_up.chunk(2, -1); silu(gate) * up`` (silu rounded to the dtype, then the product)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
