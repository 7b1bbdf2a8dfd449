"""Which int8 path (``ops.quant``) serves which batch size — measured on this machine for the model's own shape,
once, then cached in ``$LORAPLEX_CACHE/int8_plan.json`` beside the dtype measurement."""
from __future__ import annotations

import json
import logging
import time

import torch

from loraplex.engine.cpu_dtype import _cache_file, machine_key
from loraplex.ops.quant import INT8_PATHS, int8_linear, quantize_int8

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


def measure_plan(n_in: int, n_out: int, dtype: torch.dtype, device: str) -> list[tuple[int, str]]:
    """Fastest path per batch size for an ``n_in → n_out`` linear; a path 3× slower than the best is dropped for
    larger batches (it only gets slower)."""
    wq, scales = quantize_int8(torch.randn(n_out, n_in))
    wq, scales = wq.to(device), scales.to(device)
    alive, plan = list(INT8_PATHS), []
    if device != "cpu" or dtype == torch.bfloat16:
        alive.remove("int8mm_bf16")  # the same as int8mm there
    with torch.inference_mode():
        for m in BATCHES:
            x = torch.randn(m, n_in, device=device).to(dtype)
            times = {}
            for path in alive:
                try:
                    times[path] = _time(lambda: int8_linear(x, wq, scales, None, path))
                except RuntimeError:  # a kernel this build lacks for this device / dtype
                    times[path] = float("inf")
            best = min(times, key=times.get)
            alive = [p for p in alive if times[p] <= 3 * times[best]]
            if plan and plan[-1][1] == best:
                plan[-1] = (m, best)
            else:
                plan.append((m, best))
    return plan


def int8_plan(n_in: int, n_out: int, dtype: torch.dtype, device: str) -> list[tuple[int, str]]:
    """The cached plan for this machine, dtype and shape (measured on first use, ~1 s)."""
    key = f"{machine_key()} | {device} | {dtype} | {n_in}x{n_out}"
    path = _cache_file().with_name("int8_plan.json")
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    plan = cache.get(key)
    if plan is None:
        plan = measure_plan(n_in, n_out, dtype, device)
        cache[key] = plan
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass
    plan = [(int(m), p) for m, p in plan]
    log.info("int8 weights: %s", ", ".join(f"batch <= {m}: {p}" for m, p in plan))
    return plan
