"""The OpenMP runtime that torch's CPU ops and our C kernels share: per-thread pools and thread counts.

An OpenMP runtime keeps one pool of worker threads for each thread that has opened a parallel region, and the pool
lives as long as that thread. libgomp lets its workers spin between two regions only while it manages no more
threads than the process has CPUs; past that, a worker sleeps after ~1000 spins and every parallel region has to
wake it with a futex. A model loaded on one thread (which leaves a pool there) and stepped on another (a server's
engine thread, with a second pool) crosses that line on a 2-core machine: 50–150 wake-ups per batch-1 token and
decode 13 % slower (docs/benchmarks.md, "One OpenMP pool"). :func:`release_thread_pool` frees the calling thread's
pool (OpenMP 5.0 ``omp_pause_resource_all``); :func:`set_thread_count` changes the calling thread's team size only
(``torch.set_num_threads`` is process-wide).
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: free the threads and their state
_NAMES = ("libgomp", "libiomp", "libomp")


@functools.cache
def runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process once torch is imported (one, unless a library brought its own)."""
    import torch  # noqa: F401 - loads torch's runtime

    paths: list[str] = []
    try:
        for line in Path(f"/proc/{os.getpid()}/maps").read_text().splitlines():
            fields = line.split()
            path = fields[-1] if len(fields) >= 6 else ""
            if Path(path).name.startswith(_NAMES) and ".so" in path and path not in paths:
                paths.append(path)
    except OSError:  # no procfs (not Linux): torch's own copy, if it ships one
        paths = [str(p) for n in _NAMES for p in Path(torch.__file__).parent.joinpath("lib").glob(f"{n}*.so*")]
    libs = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads  # noqa: B018 - raises AttributeError where it is not an OpenMP runtime
            libs.append(lib)
        except (OSError, AttributeError):
            continue
    return tuple(libs)


def release_thread_pool() -> bool:
    """Free the OpenMP worker threads the calling thread has started (they are started again by its next parallel
    region). True when every runtime did; False where a runtime lacks OpenMP 5.0's pause or refused (inside a
    parallel region)."""
    libs = runtimes()
    try:
        return bool(libs) and all(lib.omp_pause_resource_all(OMP_PAUSE_HARD) == 0 for lib in libs)
    except AttributeError:
        return False


def set_thread_count(n: int) -> None:
    """Team size of the calling thread's later parallel regions (other threads keep theirs)."""
    for lib in runtimes():
        lib.omp_set_num_threads(int(n))
