"""A whole decode step of the decoder stack as one C call (``decode_step_cpu.c``): the op-by-op path's kernels
(``dense_cpu``, ``attention_cpu``) in its order, without Python between them — for steps of at most
``dense_cpu.GEMV_MAX_ROWS`` decode tokens, base rows or LoRA rows in the BGMV form. Its reference is that op-by-op
path (same bits).
"""
from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch

from loraplex.ops import cpu_ext, dense_cpu, lora_cpu

LAYER_FIELDS = ("ln1", "ln2", "q_norm", "k_norm", "k_cache", "v_cache")
PROJ_KINDS = {"dense": 0, "int8": 1, "int4": 2}  # the C source's PROJ_* values
DTYPES = {torch.float32: "decode_layers_f32", torch.bfloat16: "decode_layers_bf16"}
_P, _I = ctypes.c_void_p, ctypes.c_int64


class LoRAProj(ctypes.Structure):
    """One projection's LoRA slot buffers as the BGMV kernel reads them (``lora_proj`` in the C source)."""

    _fields_ = [("a", _P), ("bts", _P), ("starts", _P), ("sizes", _P), ("ranks", _P), ("n_slices", _I),
                ("n_in", _I), ("R", _I), ("max_size", _I)]


class DenseProj(ctypes.Structure):
    """One projection's base weight as the kernel reads it (``dense_proj`` in the C source)."""

    _fields_ = [("w", _P), ("b", _P), ("q", _P), ("kind", _I), ("group", _I), ("q_half", _I),
                ("tiled_steps", ctypes.c_uint64)]


class Proj(NamedTuple):
    """A projection's base weight for the table: ``kind`` (``PROJ_KINDS``), the weight, bias (or None), and for int8
    the fp32 row scales / for int4 the fp32 or fp16 scale-offset pairs and the group size; ``tiled_steps``: bit ``T - 1`` set
    where an int8 GEMV of ``T`` tokens takes the tiled form (``ops.dense_cpu.gemv_int8``)."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    group: int = 0
    tiled_steps: int = 0


class DecodeLayer(ctypes.Structure):
    """One layer's tensors as the kernel reads them (``decode_layer`` in the C source)."""

    _fields_ = [(name, ctypes.c_void_p) for name in LAYER_FIELDS] + [("proj", DenseProj * 4), ("lora", LoRAProj * 4)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_ext.library("decode_step_cpu", "the fused decode step", exact=True)
    if lib is not None:
        for name in DTYPES.values():
            fn = getattr(lib, name)
            fn.argtypes = [_P, _I, _P, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float, ctypes.c_float, _P, _P, _P, _P,
                           _P, _I, _P, _P, _I, ctypes.c_int]
            fn.restype = None
    return lib


def available(x: torch.Tensor) -> bool:
    """Does the fused step serve tensors like ``x`` (CPU, fp32 or bf16, the library built)?"""
    return x.is_cpu and x.dtype in DTYPES and _library() is not None


def layer_table(layers: list[dict], loras: list[list | None], dtype: torch.dtype, keep: list) -> ctypes.Array:
    """The kernel's per-layer table from each layer's tensors (``LAYER_FIELDS``; None where absent), its four
    projections' base weights (``"proj"``: four :class:`Proj`) and their LoRA (``(A, [Bᵀ per slice], out_slices,
    ranks)`` each, or None), all contiguous, of ``dtype`` (ranks int32; quantized weights in their own formats).
    What the table points to must outlive it: ``keep`` receives the arrays made here."""
    table = (DecodeLayer * len(layers))()
    for entry, tensors, lora in zip(table, layers, loras):
        for name in LAYER_FIELDS:
            t = tensors.get(name)
            if t is not None and (not t.is_contiguous() or t.dtype != dtype):
                raise ValueError(f"decode step: layer tensor {name} is not contiguous {dtype}")
            setattr(entry, name, None if t is None else t.data_ptr())
        for slot, proj in zip(entry.proj, tensors["proj"]):
            _set_proj(slot, proj, dtype)
        for proj, stack in zip(entry.lora, lora or ()):
            if stack is None:
                continue
            a, bts, out_slices, ranks = stack
            if not (a.is_contiguous() and all(b.is_contiguous() for b in bts) and a.dtype == dtype
                    and ranks.dtype == torch.int32 and ranks.is_contiguous()):
                raise ValueError("decode step: LoRA buffers must be contiguous, ranks int32")
            ptrs = (ctypes.c_void_p * len(bts))(*(b.data_ptr() for b in bts))
            starts, sizes, widest = lora_cpu.slice_arrays(tuple(map(tuple, out_slices)))
            keep += [ptrs, starts, sizes]
            proj.a, proj.bts, proj.ranks = a.data_ptr(), ctypes.addressof(ptrs), ranks.data_ptr()
            proj.starts, proj.sizes = ctypes.addressof(starts), ctypes.addressof(sizes)
            proj.n_slices, proj.n_in, proj.R = len(bts), a.shape[-1], bts[0].shape[1]
            proj.max_size = widest
    return table


_PROJ_DTYPES = {"int8": (torch.int8, (torch.float32,)), "int4": (torch.uint8, (torch.float32, torch.float16))}


def _set_proj(slot: DenseProj, proj: Proj, dtype: torch.dtype) -> None:
    weight_dtype, scales_dtype = _PROJ_DTYPES.get(proj.kind, (dtype, None))
    ok = proj.weight.is_contiguous() and proj.weight.dtype == weight_dtype \
        and (proj.bias is None or (proj.bias.is_contiguous() and proj.bias.dtype == dtype)) \
        and (scales_dtype is None or (proj.scales.is_contiguous() and proj.scales.dtype in scales_dtype))
    if not ok:
        raise ValueError(f"decode step: a {proj.kind} projection's tensors are not contiguous of the kernel's dtypes")
    slot.kind, slot.group, slot.w = PROJ_KINDS[proj.kind], proj.group, proj.weight.data_ptr()
    slot.tiled_steps = proj.tiled_steps
    slot.q_half = int(proj.scales is not None and proj.scales.dtype == torch.float16)
    slot.b = None if proj.bias is None else proj.bias.data_ptr()
    slot.q = None if proj.scales is None else proj.scales.data_ptr()


def decode_layers(table: ctypes.Array, h: torch.Tensor, final_norm: torch.Tensor, heads: tuple[int, int, int],
                  intermediate: int, eps: float, scale: float, cos: torch.Tensor, sin_signed: torch.Tensor,
                  slot_mapping: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor,
                  lora_slots: torch.Tensor | None = None, lora_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``h: [T, D]`` the step's embeddings → the final norm of the last residual stream ``[T, D]``, writing each
    layer's K/V at ``slot_mapping`` and attending over ``slots`` (``[T, L]``, valid up to ``lens``); ``heads``:
    ``(H, Hkv, head_dim)``; ``cos, sin_signed``: the tokens' RoPE tables ``[T, 1, head_dim]``. int64 index tensors.
    ``lora_slots: [T, K]`` each token's adapter slots (the BGMV form; ``lora_weights`` ``[T, K]``, None = ones) through
    the table's LoRA buffers; None = base rows only."""
    t, d = h.shape
    if t > dense_cpu.GEMV_MAX_ROWS or not h.is_contiguous() or slots.shape[0] != t:
        raise ValueError(f"decode step: needs <= {dense_cpu.GEMV_MAX_ROWS} contiguous decode rows")
    n_heads, n_kv, head_dim = heads
    cos, sin_signed = cos.reshape(t, head_dim).contiguous(), sin_signed.reshape(t, head_dim).contiguous()
    slot_mapping, slots, lens = (x.to(torch.int64).contiguous() for x in (slot_mapping, slots, lens))
    if lora_slots is not None:
        lora_slots = lora_slots.to(torch.int64).contiguous()
        if lora_slots.shape[0] != t:
            raise ValueError("decode step: one row of LoRA slots per token")
        if lora_weights is not None:
            lora_weights = lora_weights.to(torch.float32).contiguous()
    out = h.new_empty(t, d)
    getattr(_library(), DTYPES[h.dtype])(
        ctypes.addressof(table), len(table), h.data_ptr(), final_norm.data_ptr(), out.data_ptr(), t, d, n_heads, n_kv,
        head_dim, intermediate, eps, scale, cos.data_ptr(), sin_signed.data_ptr(), slot_mapping.data_ptr(),
        slots.data_ptr(), lens.data_ptr(), slots.shape[1], None if lora_slots is None else lora_slots.data_ptr(),
        None if lora_weights is None else lora_weights.data_ptr(), 0 if lora_slots is None else lora_slots.shape[1],
        torch.get_num_threads())
    return out
