"""``dtype="auto"`` on a CPU: bfloat16 where the CPU multiplies bf16 about as fast as fp32 (AVX-512-BF16, AMX),
float32 where bf16 is emulated (e.g. AMD Zen 3: bf16 matmuls ~3x slower than fp32) — measured, not assumed.

The measurement (a batch-32 matmul in each dtype, ~0.3 s) runs once per machine and torch build and is cached in
``$LORAPLEX_CACHE/cpu_dtype.json``. fp32 doubles the weight bytes, so a bandwidth-bound batch-1 decode loses a little
where bf16 GEMVs stream well; batched steps gain the factor measured here.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("loraplex.engine")

# bf16 is chosen when its measured matmul rate is at least this fraction of fp32's (it also halves weight bytes).
BF16_MIN_RELATIVE_RATE = 0.7
SHAPE = (32, 1024, 2816)  # tokens x in x out: a decode batch through an MLP-sized linear


def _cache_file() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex")) / "cpu_dtype.json"


def machine_key() -> str:
    """CPU model, its flags and the torch build: what decides the kernels' speed."""
    model, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if "avx" in f or "amx" in f))
    except OSError:
        pass
    return f"{model} | {flags} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def matmul_rate(dtype: torch.dtype, shape: tuple[int, int, int] = SHAPE, seconds: float = 0.12) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` (best of repeated timings over about ``seconds``)."""
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    with torch.inference_mode():
        torch.nn.functional.linear(a, b)
        best = best_time(lambda: torch.nn.functional.linear(a, b), budget=seconds)
    return 2 * m * k * n / best / 1e9


def best_time(fn: Callable[[], object], budget: float = 0.03, min_runs: int = 3) -> float:
    """The fastest of repeated runs of ``fn`` within about ``budget`` seconds (after one warm-up run, at least
    ``min_runs`` runs)."""
    fn()
    best, runs, end = float("inf"), 0, time.perf_counter() + budget
    while runs < min_runs or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best, runs = min(best, time.perf_counter() - t), runs + 1
    return best


def choose(rates: dict[str, float]) -> torch.dtype:
    """bf16 if its rate is within ``BF16_MIN_RELATIVE_RATE`` of fp32's, else fp32."""
    return torch.bfloat16 if rates["bfloat16"] >= BF16_MIN_RELATIVE_RATE * rates["float32"] else torch.float32


def cached_measurement(file_name: str, key: str, measure: Callable[[], Any]) -> Any:
    """``measure()`` once per ``key``, its JSON result kept in ``$LORAPLEX_CACHE/file_name`` (a read-only or missing
    cache only means measuring again)."""
    path = _cache_file().with_name(file_name)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass
    return cache[key]


def auto_cpu_dtype() -> torch.dtype:
    """The compute dtype for ``dtype="auto"`` on this CPU (measured once, then read from the cache)."""
    rates = cached_measurement(_cache_file().name, machine_key(), lambda: {
        "float32": matmul_rate(torch.float32), "bfloat16": matmul_rate(torch.bfloat16)})
    dtype = choose(rates)
    log.info("dtype auto: %s on this CPU (batch-32 matmul: bf16 %.0f GFLOP/s, fp32 %.0f GFLOP/s)",
             str(dtype).removeprefix("torch."), rates["bfloat16"], rates["float32"])
    return dtype
