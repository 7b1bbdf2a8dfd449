"""Which quantized-linear path (``ops.quant``) serves which batch size — measured on this machine for each of the
model's projection shapes, once, then cached in ``$LORAPLEX_CACHE/quant_plan.json`` beside the dtype measurement."""
from __future__ import annotations

import logging

import torch

from loraplex import ops
from loraplex.engine.cpu_dtype import best_time, cached_measurement, machine_key
from loraplex.engine.kernel_choice import C_GEMV_SLACK, STREAM_BYTES
from loraplex.ops import cpu_ext, dense_cpu
from loraplex.ops.quant import (
    C_PATHS,
    INT4_PATHS,
    INT8_PATHS,
    int4_group_size,
    int4_linear,
    int8_linear,
    pack_int4,
)

log = logging.getLogger("loraplex.engine")
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 512)  # rows per step measured; larger batches take the last choice
MAX_COPIES = 64  # weight copies for a small layer's measurement (up to kernel_choice.STREAM_BYTES)
BUDGET, ROUNDS = 0.05, 3  # seconds of timing per path and batch size, spread over rounds of every path in turn


def _kernels(method: str, n_in: int, n_out: int, dtype: torch.dtype, device: str):
    """(paths, ``run(x, path)``) for random ``n_in → n_out`` weights in ``method``'s format (made in that format
    directly: the LM head's shape in fp32 would be ~1 GB for a 150k vocabulary); ``run`` goes through as many copies
    as ``STREAM_BYTES`` holds for steps of up to ``GEMV_MAX_ROWS`` rows, so that the weights stream from memory as in
    a decode step (from cache a kernel's arithmetic decides, from memory its reads; larger steps are compute-bound
    and take one copy)."""
    if method == "int4":
        group = int4_group_size(n_in, 128)
        one = n_out * n_in // 2
        copies = [pack_int4(torch.randint(0, 16, (n_out, n_in), dtype=torch.uint8),
                            (torch.rand(n_out, n_in // group, 2) / 8).half().float())  # fp16 pairs, as stored
                  for _ in range(_copies(one))]
        paths = _available(INT4_PATHS, dtype, device)
        return paths, lambda x, path: [int4_linear(x, p, so, group, None, path) for p, so in _stream(x, copies)]
    copies = [(torch.randint(-127, 128, (n_out, n_in), dtype=torch.int8, device=device),
               torch.rand(n_out, device=device) / 64) for _ in range(_copies(n_out * n_in))]
    paths = _available(INT8_PATHS, dtype, device)
    return paths, lambda x, path: [int8_linear(x, wq, scales, None, path) for wq, scales in _stream(x, copies)]


def _available(paths: tuple[str, ...], dtype: torch.dtype, device: str) -> list[str]:
    """``paths`` less the C GEMVs where their library does not serve ``dtype`` on ``device``."""
    c_ok = dense_cpu.available(torch.zeros(1, dtype=dtype, device=device))
    return [p for p in paths if c_ok or p not in C_PATHS]


def _copies(nbytes: int) -> int:
    return max(1, min(MAX_COPIES, STREAM_BYTES // max(1, nbytes)))


def _stream(x: torch.Tensor, copies: list) -> list:
    return copies if x.shape[0] <= dense_cpu.GEMV_MAX_ROWS else copies[:1]


def measure_plan(n_in: int, n_out: int, dtype: torch.dtype, device: str,
                 method: str = "int8") -> list[tuple[int, str]]:
    """Fastest path per batch size for an ``n_in → n_out`` linear (a C GEMV where within ``C_GEMV_SLACK`` of it); a
    path 3× slower than the best is dropped for larger batches (it only gets slower), except ``dequant``."""
    paths, run = _kernels(method, n_in, n_out, dtype, device)
    alive, plan = paths, []
    if device != "cpu" or dtype == torch.bfloat16:
        alive = [p for p in alive if not p.endswith("_bf16")]  # the same as the plain path there
    with torch.inference_mode():
        for m in BATCHES:
            x = torch.randn(m, n_in, device=device).to(dtype)
            if m > dense_cpu.GEMV_MAX_ROWS:
                # the C GEMVs take small steps only
                alive = [p for p in alive if p not in C_PATHS] or [p for p in paths if p not in C_PATHS]
            times = dict.fromkeys(alive, float("inf"))
            for _ in range(ROUNDS):  # the paths in turn, so that a slow spell of the machine hits them all
                for path in alive:
                    try:
                        # steps the C GEMV serves: the dequant path's GEMM is the C GEMV too at run time (ops.linear
                        # inside the runner's ops.cpu_gemv, where kernel_choice measured it to serve), timed so
                        with ops.cpu_gemv(m if path == "dequant" and m <= dense_cpu.GEMV_MAX_ROWS else 0):
                            t = best_time(lambda: run(x, path), budget=BUDGET / ROUNDS, min_runs=1)
                        times[path] = min(times[path], t)
                    except RuntimeError:  # a kernel this build lacks for this device / dtype
                        pass
            best = min(times, key=times.get)
            # "dequant" stays: its cost is mostly the expansion, which larger batches share
            alive = [p for p in alive if times[p] <= 3 * times[best] or p == "dequant"]
            c_best = min((p for p in times if p in C_PATHS), key=times.get, default=None)
            if c_best is not None and times.get(f"{method}_c", float("inf")) <= C_GEMV_SLACK * times[c_best]:
                c_best = f"{method}_c"  # the pass form reads each weight once, no scratch: it keeps near-ties
            if c_best is not None and times[c_best] <= C_GEMV_SLACK * times[best]:
                best = c_best
            if plan and plan[-1][1] == best:
                plan[-1] = (m, best)
            else:
                plan.append((m, best))
    return plan


def quant_plan(method: str, n_in: int, n_out: int, dtype: torch.dtype, device: str) -> list[tuple[int, str]]:
    """The cached plan for this machine, method, dtype and shape (measured on first use, ~2–3 s)."""
    paths = ",".join(INT4_PATHS if method == "int4" else INT8_PATHS)  # a new path: measured again
    key = (f"{machine_key()} | {device} | {dtype} | {method} {n_in}x{n_out} | {paths} {cpu_ext.sources_key()} "
           f"streamed, C slack {C_GEMV_SLACK}, dequant kept, its GEMV as run, {ROUNDS} rounds in turn, pass form on ties")
    plan = cached_measurement("quant_plan.json", key, lambda: measure_plan(n_in, n_out, dtype, device, method))
    plan = [(int(m), p) for m, p in plan]
    log.info("%s weights %dx%d: %s", method, n_in, n_out, ", ".join(f"batch <= {m}: {p}" for m, p in plan))
    return plan
