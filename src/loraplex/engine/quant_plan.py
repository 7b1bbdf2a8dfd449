"""Which quantized-linear path (``ops.quant``) serves which batch size — measured on this machine for each of the
model's projection shapes, once, then cached in ``$LORAPLEX_CACHE/quant_plan.json`` beside the dtype measurement."""
from __future__ import annotations

import logging
import time

import torch

from loraplex.engine.cpu_dtype import cached_measurement, machine_key
from loraplex.ops.quant import (
    INT4_PATHS,
    INT8_PATHS,
    int4_group_size,
    int4_linear,
    int8_linear,
    pack_int4,
    quantize_int4,
    quantize_int8,
)

log = logging.getLogger("loraplex.engine")
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 512)  # rows per step measured; larger batches take the last choice


def _time(fn, budget: float = 0.05) -> float:
    fn()
    best, end = float("inf"), time.perf_counter() + budget
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _kernels(method: str, n_in: int, n_out: int, device: str):
    """(paths, ``run(x, path)``) for a random ``n_in → n_out`` weight quantized by ``method``."""
    w = torch.randn(n_out, n_in)
    if method == "int4":
        group = int4_group_size(n_in, 128)
        q, sz = quantize_int4(w, group)
        packed = pack_int4(q)
        return list(INT4_PATHS), lambda x, path: int4_linear(x, packed, group, sz, None, path)
    wq, scales = quantize_int8(w)
    wq, scales = wq.to(device), scales.to(device)
    return list(INT8_PATHS), lambda x, path: int8_linear(x, wq, scales, None, path)


def measure_plan(n_in: int, n_out: int, dtype: torch.dtype, device: str,
                 method: str = "int8") -> list[tuple[int, str]]:
    """Fastest path per batch size for an ``n_in → n_out`` linear; a path 3× slower than the best is dropped for
    larger batches (it only gets slower)."""
    paths, run = _kernels(method, n_in, n_out, device)
    alive, plan = paths, []
    if device != "cpu" or dtype == torch.bfloat16:
        alive = [p for p in alive if not p.endswith("_bf16")]  # the same as the plain path there
    with torch.inference_mode():
        for m in BATCHES:
            x = torch.randn(m, n_in, device=device).to(dtype)
            times = {}
            for path in alive:
                try:
                    times[path] = _time(lambda: run(x, path))
                except RuntimeError:  # a kernel this build lacks for this device / dtype
                    times[path] = float("inf")
            best = min(times, key=times.get)
            alive = [p for p in alive if times[p] <= 3 * times[best]]
            if plan and plan[-1][1] == best:
                plan[-1] = (m, best)
            else:
                plan.append((m, best))
    return plan


def quant_plan(method: str, n_in: int, n_out: int, dtype: torch.dtype, device: str) -> list[tuple[int, str]]:
    """The cached plan for this machine, method, dtype and shape (measured on first use, ~1 s)."""
    key = f"{machine_key()} | {device} | {dtype} | {method} {n_in}x{n_out}"
    plan = cached_measurement("quant_plan.json", key, lambda: measure_plan(n_in, n_out, dtype, device, method))
    plan = [(int(m), p) for m, p in plan]
    log.info("%s weights %dx%d: %s", method, n_in, n_out, ", ".join(f"batch <= {m}: {p}" for m, p in plan))
    return plan
