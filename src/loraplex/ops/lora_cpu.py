"""BGMV on the CPU without per-token copies: a small C kernel (``lora_cpu.c``) that reads each token's adapter from
the slot buffers in place, at the adapter's true rank, with OpenMP over tokens (torch's own OpenMP runtime).

Built at first use (``ops.cpu_ext``); where that fails ``available()`` is False and ``ops`` keeps the torch form
(``lora_torch.bgmv_shrink`` / ``bgmv_expand``), which is also this kernel's reference in the tests.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from loraplex.ops import cpu_ext

DTYPES = {torch.float32: "bgmv_f32", torch.bfloat16: "bgmv_bf16"}
_P, _I = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _I, _P, _P, _P, _I, _P, _P, _I, _P, _P, _I, _I, _P, _I, _I, _I, ctypes.c_int]


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_ext.library("lora_cpu", "BGMV", exact=True)  # as the fused decode step compiles it
    if lib is not None:
        for name in DTYPES.values():
            getattr(lib, name).argtypes = _ARGTYPES
            getattr(lib, name).restype = None
    return lib


def available(x: torch.Tensor) -> bool:
    """Does the C kernel serve tensors like ``x`` (CPU, fp32 or bf16, the library built)?"""
    return x.device.type == "cpu" and x.dtype in DTYPES and _library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@functools.lru_cache(maxsize=256)
def slice_arrays(out_slices: tuple[tuple[int, int], ...]) -> tuple[ctypes.Array, ctypes.Array, int]:
    """A stack's output slices as the kernel's (starts, sizes) arrays and the widest slice (they never change)."""
    starts = (ctypes.c_int64 * len(out_slices))(*(s for s, _ in out_slices))
    sizes = (ctypes.c_int64 * len(out_slices))(*(n for _, n in out_slices))
    return starts, sizes, max(n for _, n in out_slices)


def add_lora_bgmv_cpu(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bts: list[torch.Tensor],
                      out_slices: list[tuple[int, int]], slots: torch.Tensor, weights: torch.Tensor | None,
                      ranks: torch.Tensor) -> None:
    """``y[t, slice_i] += Σ_k w[t, k] · B_i[s] (A_i[s] x[t])`` with ``s = slots[t, k]``, read in place at rank
    ``ranks[s]`` (see ``lora_cpu.c``). ``lora_a: [S, n·R, in]`` is the ``LoRAStack`` buffer and ``lora_bts[i]:
    [S, R, size_i]`` its B buffers transposed (``B_i[s] = lora_bts[i][s].T``), all contiguous; ``y`` and ``x`` have
    contiguous rows."""
    if x.stride(-1) != 1 or y.stride(-1) != 1 or not lora_a.is_contiguous() or \
            not all(b.is_contiguous() for b in lora_bts):
        raise ValueError("add_lora_bgmv_cpu: needs contiguous rows and slot buffers")
    n_tokens, k_pairs = slots.shape
    width = lora_bts[0].shape[1]
    slots = slots.to(torch.int64).contiguous()
    weights = None if weights is None else weights.to(torch.float32).contiguous()
    ranks = ranks.to(torch.int32).contiguous()
    starts, sizes, widest = slice_arrays(tuple(map(tuple, out_slices)))
    bts = (ctypes.c_void_p * len(lora_bts))(*(b.data_ptr() for b in lora_bts))
    getattr(_library(), DTYPES[x.dtype])(
        x.data_ptr(), x.stride(0), lora_a.data_ptr(), bts, y.data_ptr(), y.stride(0), starts, sizes, len(lora_bts),
        slots.data_ptr(), _ptr(weights), n_tokens, k_pairs, ranks.data_ptr(), x.shape[1], width,
        widest, torch.get_num_threads())
