"""A CPU model's weights and KV caches in transparent huge pages (2 MB pages, Linux).

A decode step streams every weight once, and on this kind of machine a streaming read from 4 KB pages runs well
below the memory's rate: a 2-core Zen 4 read 25 GB/s from 4 KB pages and 32 GB/s from huge pages (a C loop, 256 MB,
2 threads), and SmolLM2's bf16 batch-1 decode went from 85 to 96 tok/s with its weights moved (bench_engine.py).
torch's CPU allocator gives huge pages only to allocations of ≥ 2 MB and only when ``THP_MEM_ALLOC_ENABLE`` is set
before its first allocation; a small decoder's projections are 0.1–2 MB each. So the model runner copies the
model's parameters and buffers, after loading, into one anonymous private mapping advised ``MADV_HUGEPAGE``, in
module order (the order a step reads them), each tensor then a view of it (tied weights stay one tensor); tensors
of ``IN_PLACE_BYTES`` or more (an embedding, an LM head) stay where they are and have their whole 2 MB extents
collapsed into huge pages in place (``MADV_COLLAPSE``, Linux ≥ 6.1), so moving costs no more memory than one small
tensor. The KV caches are carved from another arena (its pages come zeroed: no copy, no fill, resident as used).

Off where the kernel has THP set to ``never``, off Linux, or with ``LORAPLEX_NO_HUGEPAGES=1`` (for A/B runs);
without huge pages granted (fragmented memory) the mapping simply stays on 4 KB pages.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
import os
import sys
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line
IN_PLACE_BYTES = 16 << 20  # tensors this large are collapsed in place rather than copied
_MADV_COLLAPSE = 25  # linux/mman.h (Linux 6.1); not in Python's mmap module
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Can this process ask for huge pages (Linux with THP not ``never``, not switched off by the environment)?"""
    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE") or os.environ.get("LORAPLEX_NO_HUGEPAGES"):
        return False
    try:
        return "[never]" not in _THP_SETTING.read_text()
    except OSError:
        return False


class Arena:
    """``nbytes`` of anonymous private memory advised ``MADV_HUGEPAGE`` (zero until written), handed out in order as
    tensors by ``take``; it lives as long as any of them (each view holds the mapping)."""

    def __init__(self, nbytes: int) -> None:
        self._map = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._map.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the faults then map 2 MB pages
        self._base = torch.frombuffer(self._map, dtype=torch.uint8)
        self._next = (-self._base.data_ptr()) % HUGE_PAGE  # the first tensor on a huge-page boundary
        self._limit = self._next + nbytes
        self.start = self._base.data_ptr() + self._next
        self.end = self.start + nbytes

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The next ``shape`` of ``dtype`` (contiguous, cache-line aligned)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self._next + nbytes > self._limit:
            raise ValueError(f"arena: {nbytes} bytes more do not fit")
        view = self._base[self._next:self._next + nbytes].view(dtype).view(shape)
        self._next += _padded(nbytes)
        return view

    def holds(self, t: torch.Tensor) -> bool:
        """Does ``t``'s data lie in this arena?"""
        return self.start <= t.data_ptr() < self.end


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def collapse(t: torch.Tensor) -> bool:
    """Back the 2 MB extents inside ``t``'s memory by huge pages in place (``MADV_HUGEPAGE`` + ``MADV_COLLAPSE``);
    whether the kernel did (best effort: older kernels, no free huge page → False, ``t`` unchanged either way)."""
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    libc = _libc()
    if end <= start or libc is None:
        return False
    return libc.madvise(start, end - start, mmap.MADV_HUGEPAGE) == 0 \
        and libc.madvise(start, end - start, _MADV_COLLAPSE) == 0


def release_freed() -> None:
    """Hand freed heap pages back to the OS (glibc keeps the holes that freed tensors leave between live ones, and
    peak RSS counts them); nothing where the C library is not glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def move_module(module: nn.Module) -> Arena | None:
    """Copy ``module``'s CPU parameters and buffers (contiguous ones below ``IN_PLACE_BYTES``; larger ones are
    collapsed in place) into one arena, in module order, and make each a view of it (a ``Parameter`` keeps its
    identity: ``.data`` is swapped). Returns the arena (None: nothing moved). Each old tensor is freed (and its
    heap pages handed back) as it is replaced, so the peak is the model plus a few small tensors."""
    entries = []  # (owner dict, name, original address, bytes): tied tensors share their address
    large: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or not t.is_contiguous() or not t.numel():
                    continue
                if t.numel() * t.element_size() >= IN_PLACE_BYTES:
                    large[t.data_ptr()] = t
                else:
                    entries.append((table, name, t.data_ptr(), _padded(t.numel() * t.element_size())))
    collapsed = sum(collapse(t) for t in large.values())
    if large:
        log.info("huge pages: %d of %d large tensors collapsed in place", collapsed, len(large))
    del large
    sizes = {ptr: n for _, _, ptr, n in entries}
    if not sizes:
        return None
    arena = Arena(sum(sizes.values()))
    moved: dict[int, torch.Tensor] = {}
    freed = 0
    with torch.no_grad():
        for table, name, ptr, nbytes in entries:  # no other reference to the old tensor: it goes when replaced
            if ptr not in moved:
                moved[ptr] = arena.take(table[name].shape, table[name].dtype).copy_(table[name])
                freed += nbytes
            if isinstance(table[name], nn.Parameter):
                table[name].data = moved[ptr]
            else:
                table[name] = moved[ptr]
            if freed >= IN_PLACE_BYTES:
                release_freed()
                freed = 0
    release_freed()
    log.info("huge pages: %d tensors (%.0f MB) moved", len(moved), sum(sizes.values()) / 1e6)
    return arena


def zeros(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Zero tensors of ``shapes`` side by side in one arena (anonymous pages come zeroed: nothing is written)."""
    arena = Arena(sum(_padded(math.prod(s) * dtype.itemsize) for s in shapes))
    return [arena.take(s, dtype) for s in shapes]
