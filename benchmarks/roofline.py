"""The machine's limits, measured in the same run as a benchmark: read bandwidth, matmul rate at the model's own
shapes and dtype, and the floor of a case ``max(bytes / bandwidth, flops / matmul rate)``.

    from roofline import Roofline
    roof = Roofline.measure(model_shapes(spec), dtype, rows=(1, 32))
    print(roof.header())
    floor_s = roof.floor_seconds(bytes_moved, flops, rows=32)
    floor_tps = roof.decode_floor(spec, weight_bytes(model) + n * lora_bytes(spec, 16, 2), rows=32)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from loraplex.ops import hugepages

MIN_ROWS = 32  # the smallest GEMM whose rate is measured as a compute ceiling
# torch's thread count before any engine ran: an engine's thread tuner may leave the process on fewer, and the
# machine's limits are measured on all of them
MACHINE_THREADS = torch.get_num_threads()

# CPU features that decide which kernels a CPU has (bf16 in hardware, AMX, AVX-512)
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name (with family/model numbers) and which of ``FLAGS`` it has, from /proc/cpuinfo."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    info.setdefault(k.strip(), v.strip())
    except OSError:
        return "unknown", []
    flags = set(info.get("flags", "").split())
    name = f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"
    return name, [f for f in FLAGS if f in flags]


def read_bandwidth(nbytes: int = 256 << 20) -> float:
    """Read bandwidth in bytes/s: the best of 5 sums over a large fp32 buffer (a streaming read, as a GEMV reads
    its weights), on 4 KB pages and, where the engine gets them (``ops.hugepages``), on 2 MB pages — the faster
    counts: the engine's weights live there. A copy is no measure of it: its writes cost as much again (on a 2-core
    Zen 4 a copy moved 15 GB/s where a sum read 30)."""
    bufs = [torch.ones(nbytes // 4)]
    if hugepages.available():
        bufs.append(hugepages.zeros([(nbytes // 4,)], torch.float32)[0].fill_(1.0))
    best = float("inf")
    for src in bufs:
        src.sum()
        for _ in range(5):
            t = time.perf_counter()
            src.sum()
            best = min(best, time.perf_counter() - t)
    return nbytes / best


def matmul_rate(shapes: list[tuple[int, int]], rows: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of ``x[rows, in] @ W[out, in].T`` over the given ``(in, out)`` weight shapes (the model's own), best
    of ``repeats`` passes over all of them."""
    ws = [torch.randn(o, i, dtype=dtype) for i, o in shapes]
    xs = [torch.randn(rows, i, dtype=dtype) for i, _ in shapes]
    flops = sum(2 * rows * i * o for i, o in shapes)
    for x, w in zip(xs, ws):
        F.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for x, w in zip(xs, ws):
            F.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return flops / best


@dataclass
class Roofline:
    """Measured limits: ``bandwidth`` (bytes/s read) and ``rate[rows]`` (FLOP/s at that many rows)."""

    bandwidth: float
    rate: dict[int, float] = field(default_factory=dict)
    cpu: str = ""
    flags: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32

    @classmethod
    def measure(cls, shapes: list[tuple[int, int]], dtype: torch.dtype, rows: tuple[int, ...] = (1, 32)) -> "Roofline":
        """Bandwidth, and the matmul rate at each case's row count (at least ``MIN_ROWS``: below it a GEMM is a
        GEMV bound by reading its weights, which the bandwidth term already counts)."""
        name, flags = cpu_model()
        threads = torch.get_num_threads()
        torch.set_num_threads(MACHINE_THREADS)
        try:
            rates = {m: matmul_rate(shapes, max(m, MIN_ROWS), dtype) for m in rows}
            return cls(read_bandwidth(), rates, name, flags, dtype)
        finally:
            torch.set_num_threads(threads)

    def floor_seconds(self, bytes_moved: float, flops: float, rows: int) -> float:
        """The least time a step can take: reading its bytes, or computing its FLOPs at this row count's rate."""
        return max(bytes_moved / self.bandwidth, flops / self.rate[rows])

    def decode_floor(self, spec, bytes_moved: float, rows: int) -> float:
        """The most tokens/s decode steps of ``rows`` rows can give when each reads ``bytes_moved`` (weights + the
        adapters its rows use): ``rows / floor_seconds(bytes_moved, forward_flops(spec, rows), rows)``."""
        return rows / self.floor_seconds(bytes_moved, forward_flops(spec, rows), rows)

    def header(self) -> str:
        rates = ", ".join(f"{m} rows (measured at M={max(m, MIN_ROWS)}): {r / 1e9:.0f} GFLOP/s"
                          for m, r in self.rate.items())
        return (f"CPU {self.cpu} [{' '.join(self.flags) or 'no AVX2'}], {MACHINE_THREADS} threads, torch "
                f"{torch.__version__}; read bandwidth {self.bandwidth / 1e9:.1f} GB/s; "
                f"{str(self.dtype).removeprefix('torch.')} matmul at the model's shapes {rates}")


def model_shapes(spec) -> list[tuple[int, int]]:
    """``(in, out)`` of every token-row GEMM in one forward of a decoder: the stacked projections of each layer and
    the LM head (``spec``: a ``ModelSpec``)."""
    s = spec
    per_layer = [(s.hidden_size, s.q_size + 2 * s.kv_size), (s.q_size, s.hidden_size),
                 (s.hidden_size, 2 * s.intermediate_size), (s.intermediate_size, s.hidden_size)]
    return per_layer * s.num_layers + [(s.hidden_size, s.vocab_size)]


def forward_flops(spec, tokens: int) -> float:
    """Matmul FLOPs of a forward over ``tokens`` tokens (attention's own, small at these lengths, left out)."""
    return sum(2 * tokens * i * o for i, o in model_shapes(spec))


def weight_bytes(model) -> int:
    """Bytes of a model's weights as stored, what a decode step reads: its dtype, or a quantized format's packed
    values and scales (the state dict's tensors, tied ones counted once; non-persistent buffers such as rope tables
    and LoRA slots, which are not in it, left out)."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())


def gemm_weight_bytes(spec, elem_bytes: int) -> int:
    """Bytes of the weights of ``model_shapes(spec)`` at ``elem_bytes`` per value, for a model in another process
    (a server): every projection and the LM head; embedding rows and norms, a few KB per step, left out."""
    return sum(i * o for i, o in model_shapes(spec)) * elem_bytes


def lora_bytes(spec, rank: int, elem_bytes: int, modules=None) -> int:
    """Bytes of one rank-``rank`` LoRA adapter on ``modules`` (default: every linear) of every layer:
    ``rank · (in + out) · elem_bytes`` per module per layer."""
    shapes = spec.module_shapes.shapes
    per_layer = sum(i + o for m, (i, o) in shapes.items() if modules is None or m in modules)
    return spec.num_layers * rank * per_layer * elem_bytes


def adapter_bytes(path, elem_bytes: int) -> int:
    """Bytes of the tensors in a PEFT directory's ``adapter_model.safetensors`` (a LoRA's A and B, or an X-LoRA's
    classifier) at ``elem_bytes`` per value, the run's dtype; ``path`` may name a demo adapter (``"pirate"``)."""
    from safetensors import safe_open

    from loraplex.lora.demo import resolve_adapter_path

    with safe_open(str(Path(resolve_adapter_path(str(path))) / "adapter_model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * elem_bytes
