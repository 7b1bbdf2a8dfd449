"""Paged decode attention on the CPU as C kernels (``attention_cpu.c``): the KV-cache write and the decodes'
attention read the cache in place by slot (no gathered copies of K and V, no padding mask). The torch reference is
``decode_attention_reference``; built at first use (``ops.cpu_ext``), else ``available()`` is False and
``layers.attention`` keeps its SDPA form.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from loraplex.ops import cpu_ext

DTYPES = {torch.float32: "decode_attention_f32", torch.bfloat16: "decode_attention_bf16"}
_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_ext.library("attention_cpu", "decode attention", exact=True)  # as the fused step compiles it
    if lib is not None:
        lib.kv_write.argtypes, lib.kv_write.restype = [_P, _I, _P, _I, _P, _I, _P, _P, _I], None
        for name in DTYPES.values():
            fn = getattr(lib, name)
            fn.argtypes = [_P, _I, _P, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_float, _P, ctypes.c_int]
            fn.restype = None
    return lib


def available(x: torch.Tensor) -> bool:
    """Do the C kernels serve tensors like ``x`` (CPU, fp32 or bf16, the library built)?"""
    return x.is_cpu and x.dtype in DTYPES and _library() is not None


def serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Can the kernels take this layer's step as laid out (one dtype, per-token contiguous heads, contiguous
    caches)? Then ``kv_write`` and ``decode_attention`` may be called with ``checked=True``."""
    return available(q) and q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype and _rows(q) \
        and _rows(k) and _rows(v) and k_cache.is_contiguous() and v_cache.is_contiguous() \
        and q.shape[1] % k_cache.shape[1] == 0


def _rows(x: torch.Tensor) -> bool:
    """``[T, heads, D]`` with each token's heads contiguous."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def _int64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, checked: bool = False) -> None:
    """``k_cache[slot_mapping] = k; v_cache[slot_mapping] = v`` for ``k, v: [T, Hkv, D]`` (heads contiguous per
    token) into contiguous caches ``[slots, Hkv, D]``. ``checked``: ``serves`` said yes and ``slot_mapping`` is
    contiguous int64 (the model runner builds it so)."""
    if not checked:
        if not (_rows(k) and _rows(v) and k_cache.is_contiguous() and v_cache.is_contiguous()) \
                or k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise ValueError("kv_write: needs per-token contiguous heads and contiguous caches of the same dtype")
        slot_mapping = _int64(slot_mapping)
    size = k.element_size()
    _library().kv_write(k.data_ptr(), k.stride(0) * size, v.data_ptr(), v.stride(0) * size, slot_mapping.data_ptr(),
                        k.shape[0], k_cache.data_ptr(), v_cache.data_ptr(), k.shape[1] * k.shape[2] * size)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float, checked: bool = False) -> torch.Tensor:
    """``q: [nd, H, D]`` (heads contiguous per token) over contiguous caches ``[slots, Hkv, D]``; ``slots: [nd, L]``
    each row's context slots (valid up to ``lens[t]``) → ``[nd, H, D]``; see ``decode_attention_reference``.
    ``checked``: ``serves`` said yes and ``slots`` / ``lens`` are contiguous int64 (the model runner builds them so)."""
    nd, h, d = q.shape
    if not checked:
        if not _rows(q) or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or h % k_cache.shape[1] \
                or not (q.dtype == k_cache.dtype == v_cache.dtype):
            raise ValueError("decode_attention: needs per-token contiguous heads, contiguous caches of q's dtype and "
                             "H divisible by Hkv")
        slots, lens = _int64(slots), _int64(lens)
    out = q.new_empty(nd, h, d)
    getattr(_library(), DTYPES[q.dtype])(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                         slots.data_ptr(), lens.data_ptr(), slots.shape[1], nd, h, k_cache.shape[1],
                                         d, scale, out.data_ptr(), torch.get_num_threads())
    return out


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                               lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Semantics, in fp32: ``out[t, h] = softmax(scale · q[t, h] @ K.T) @ V`` over ``K, V = cache[slots[t, :lens[t]],
    h // (H / Hkv)]``, rounded once to ``q.dtype``."""
    nd, h, _ = q.shape
    group = h // k_cache.shape[1]
    out = torch.empty_like(q)
    for t in range(nd):
        ctx = slots[t, :int(lens[t])]
        k = k_cache[ctx].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, n, D]
        v = v_cache[ctx].float().repeat_interleave(group, dim=1).transpose(0, 1)
        w = torch.softmax(scale * (q[t].float().unsqueeze(1) @ k.transpose(1, 2)), dim=-1)  # [H, 1, n]
        out[t] = (w @ v).squeeze(1).to(q.dtype)
    return out
