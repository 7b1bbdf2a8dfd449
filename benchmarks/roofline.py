"""The machine's limits, measured in the same run as a benchmark: copy bandwidth, matmul rate at the model's own
shapes and dtype, and the floor of a case ``max(bytes / bandwidth, flops / matmul rate)``.

    from roofline import Roofline
    roof = Roofline.measure(model_shapes, dtype, rows=(1, 32))
    print(roof.header())
    floor_s = roof.floor_seconds(bytes_moved, flops, rows=32)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MIN_ROWS = 32  # the smallest GEMM whose rate is measured as a compute ceiling

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


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Read bandwidth in bytes/s: the best of 5 copies of a large buffer (a copy reads and writes each byte once,
    so read bandwidth = 2 · bytes / seconds / 2)."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
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
        rates = {m: matmul_rate(shapes, max(m, MIN_ROWS), dtype) for m in rows}
        return cls(copy_bandwidth(), rates, name, flags, dtype)

    def floor_seconds(self, bytes_moved: float, flops: float, rows: int) -> float:
        """The least time a step can take: reading its bytes, or computing its FLOPs at this row count's rate."""
        return max(bytes_moved / self.bandwidth, flops / self.rate[rows])

    def header(self) -> str:
        rates = ", ".join(f"{m} rows (measured at M={max(m, MIN_ROWS)}): {r / 1e9:.0f} GFLOP/s"
                          for m, r in self.rate.items())
        return (f"CPU {self.cpu} [{' '.join(self.flags) or 'no AVX2'}], {torch.get_num_threads()} threads, torch "
                f"{torch.__version__}; copy bandwidth {self.bandwidth / 1e9:.1f} GB/s read; "
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
