"""Where two kernels compete, which one serves which step — measured on this machine at the model's own shapes,
once, then cached in ``$LORAPLEX_CACHE/kernel_choice.json`` (beside the dtype and quantization measurements).

The choices (each was a constant fitted to one CPU before):

* ``gemv_tokens``: CPU steps of at most this many tokens run their GEMMs with oneDNN off (ATen's own kernel). For one
  row, ATen's bf16 GEMV streams weights up to ~2× faster than oneDNN on some CPUs (Zen 4), not on others; from a few
  rows up oneDNN wins. 0 = never bypass.
* ``c_gemv_tokens``: steps of at most this many tokens run their dense linears by the C GEMV (``ops.dense_cpu``)
  where it beats both torch forms; 0 = never (or the C kernels are not built).
* ``dense_lora_ratio``: decode tokens per distinct adapter from which the dense LoRA form (each adapter read once,
  as GEMMs over all the step's adapters) beats the per-token BGMV gather (``engine.lora_batch``). ``inf`` = never.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex import ops
from loraplex.ops import cpu_ext, dense_cpu
from loraplex.engine.cpu_dtype import best_time, cached_measurement, machine_key
from loraplex.engine.lora_batch import DENSE_LORA_TOKENS_PER_ADAPTER, MEASURED_TOKENS_PER_ADAPTER
from loraplex.layers.lora import LoRAStack
from loraplex.layers.projections import PROJECTIONS
from loraplex.models.model_config import ModelSpec
from loraplex.ops.lora_batch import Bgmv, Dense, LoRABatch

log = logging.getLogger("loraplex.engine")

GEMV_ROWS = (1, 2, 3, 4)  # step sizes measured with and without oneDNN
C_GEMV_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # step sizes measured for the C GEMV (≤ dense_cpu.GEMV_MAX_ROWS)
STREAM_BYTES = 96 << 20  # the GEMV measurement cycles through this many bytes of weights: more than a cache holds
# a C GEMV within this factor of the fastest other path counts as serving a step size: with the C GEMV on every
# projection a decode step runs the whole stack in one call (ops.decode_step_cpu), which a per-layer measurement
# does not see (and a tie, e.g. with ATen's GEMV at one token, must not switch the fused step off)
C_GEMV_SLACK = 1.1
DECODES, RANK = 32, 16  # the LoRA measurement: a decode batch over adapters of this rank
# distinct adapters among the DECODES tokens: tokens per adapter 1, 2, 4, 8, 16
ADAPTERS = tuple(DECODES // r for r in (1, 2, 4, 8, MEASURED_TOKENS_PER_ADAPTER))


@dataclass(frozen=True)
class KernelChoice:
    """The measured choices (see the module docstring); the field defaults serve where nothing is measured."""

    gemv_tokens: int = 0
    dense_lora_ratio: float = DENSE_LORA_TOKENS_PER_ADAPTER
    c_gemv_tokens: int = 0


@contextmanager
def onednn(enabled: bool):
    """oneDNN on or off for the block (never turned on where this process has it off)."""
    prev = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(enabled and prev)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(prev)


def _layer_shapes(s: ModelSpec) -> list[tuple[int, int]]:
    """``(in, out)`` of one decoder layer's four dense projections."""
    return [(s.hidden_size, s.q_size + 2 * s.kv_size), (s.q_size, s.hidden_size),
            (s.hidden_size, 2 * s.intermediate_size), (s.intermediate_size, s.hidden_size)]


def measure_gemv_tokens(spec: ModelSpec, dtype: torch.dtype) -> int:
    """The largest step size in ``GEMV_ROWS`` up to which one layer's GEMMs run faster with oneDNN off."""
    ws = [torch.randn(o, i).to(dtype) for i, o in _layer_shapes(spec)]
    if not torch._C._get_mkldnn_enabled():
        return 0  # oneDNN is off in this process anyway
    best = 0
    for m in GEMV_ROWS:
        xs = [torch.randn(m, w.shape[1]).to(dtype) for w in ws]

        def layer() -> None:
            for x, w in zip(xs, ws):
                F.linear(x, w)

        times = {}
        for enabled in (True, False):
            with onednn(enabled):
                times[enabled] = best_time(layer)
        if times[False] >= times[True]:
            break
        best = m
    return best


def measure_c_gemv_tokens(spec: ModelSpec, dtype: torch.dtype) -> int:
    """The largest step size in ``C_GEMV_ROWS`` up to which the C GEMV is within ``C_GEMV_SLACK`` of the faster
    torch form (oneDNN on or off) on every size from 1, over as many layers' weights as ``STREAM_BYTES`` holds (the
    weights stream from memory, as in a decode step). 0 where the C kernels are not built."""
    if not dense_cpu.available(torch.zeros(1, dtype=dtype)):
        return 0
    shapes = _layer_shapes(spec)
    layer_bytes = sum(i * o for i, o in shapes) * torch.finfo(dtype).bits // 8
    n_layers = max(1, min(spec.num_layers, STREAM_BYTES // layer_bytes))
    ws = [torch.empty(o, i, dtype=dtype).uniform_(-0.05, 0.05) for _ in range(n_layers) for i, o in shapes]
    best = 0
    for m in C_GEMV_ROWS:
        xs = {i: torch.randn(m, i).to(dtype) for i, _ in shapes}

        def layers(fn) -> None:
            for w in ws:
                fn(xs[w.shape[1]], w)

        times = []
        for enabled in (True, False):
            with onednn(enabled):
                times.append(best_time(lambda: layers(F.linear), budget=0.1))
        if best_time(lambda: layers(dense_cpu.gemv), budget=0.1) > C_GEMV_SLACK * min(times):
            break
        best = m
    return best


def measure_dense_lora_ratio(spec: ModelSpec, dtype: torch.dtype) -> float:
    """The fewest decode tokens per adapter at which the dense form beats BGMV (whichever BGMV kernel serves here:
    the C kernel or the torch gather), on real ``LoRAStack`` s of the model's q|k|v and down projections (rank
    ``RANK``, ``DECODES`` tokens), holding for every larger ratio measured."""
    shapes = spec.module_shapes
    stacks, xs, ys = [], [], []
    n_slots = max(ADAPTERS)
    for p in (PROJECTIONS[0], PROJECTIONS[3]):
        stack = LoRAStack(p, shapes, n_slots, RANK, dtype, "cpu")
        for slot in range(n_slots):
            stack.set_slot(slot, {m: (torch.randn(RANK, shapes.shapes[m][0]).to(dtype),
                                      torch.randn(shapes.shapes[m][1], RANK).to(dtype)) for m in p.modules})
        stacks.append(stack)
        xs.append(torch.randn(DECODES, shapes.in_features(p)).to(dtype))
        ys.append(torch.zeros(DECODES, sum(shapes.out_sizes(p)), dtype=dtype))
    wins: list[tuple[float, bool]] = []
    for d in ADAPTERS:
        token_slots = torch.arange(DECODES) % d
        used = frozenset(range(d))
        forms = {"bgmv": LoRABatch(DECODES, Bgmv(token_slots.unsqueeze(1)), used_slots=used),
                 "dense": LoRABatch(DECODES, Dense(torch.arange(d), token_slots), used_slots=used)}
        times = {name: best_time(lambda: [st(y, x, batch) for st, x, y in zip(stacks, xs, ys)])
                 for name, batch in forms.items()}
        wins.append((DECODES / d, times["dense"] < times["bgmv"]))
    ratio = math.inf
    for tokens_per_adapter, dense_wins in reversed(wins):  # from the most tokens per adapter down
        if not dense_wins:
            break
        ratio = tokens_per_adapter
    return ratio


def kernel_choice(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> KernelChoice:
    """The cached choice for this machine, dtype and model shape (measured on first use, ~0.5 s); the defaults
    where the Triton kernels serve (CUDA, or CPU tensors under ``LORAPLEX_TRITON=1``): they are not what this
    measures."""
    if device.type != "cpu" or ops.use_triton(device):
        return KernelChoice()
    bgmv = "C" if ops.cpu_bgmv_serves(torch.zeros(1, dtype=dtype)) else "torch"  # which BGMV the ratio is against
    key = (f"{machine_key()} | {dtype} | {spec.hidden_size}x{spec.intermediate_size} "
           f"q{spec.q_size} kv{spec.kv_size} | BGMV {bgmv} | C GEMV {dense_cpu.available(torch.zeros(1, dtype=dtype))} "
           f"{cpu_ext.sources_key()} slack {C_GEMV_SLACK}")

    def measure() -> dict:
        with torch.inference_mode():
            return {"gemv_tokens": measure_gemv_tokens(spec, dtype),
                    "dense_lora_ratio": measure_dense_lora_ratio(spec, dtype),
                    "c_gemv_tokens": measure_c_gemv_tokens(spec, dtype)}

    got = cached_measurement("kernel_choice.json", key, measure)
    choice = KernelChoice(int(got["gemv_tokens"]), float(got["dense_lora_ratio"]), int(got["c_gemv_tokens"]))
    log.info("kernels measured here: steps of <= %d tokens bypass oneDNN, of <= %d take the C GEMV; the dense LoRA "
             "form from %s decode tokens per adapter", choice.gemv_tokens, choice.c_gemv_tokens,
             choice.dense_lora_ratio)
    return choice
