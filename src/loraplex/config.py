"""Frozen configuration dataclasses composed into :class:`EngineConfig`: the one place each knob and its default live.

Each layer of the engine reads only its own section; derived values are properties, never stored twice.
``LLM(...)``, ``LLMEngine.from_args`` and the command lines (``serve``, ``generate``, ``chat``) take their defaults
from the class attributes here (``LoRAConfig.max_loras``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Map a user-facing dtype name (vLLM spelling) to a torch dtype. ``"auto"`` = bf16 here; on a CPU the engine
    replaces it by a measured choice (``engine.cpu_dtype``)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ValueError(f"dtype: unsupported {dtype}; use bfloat16, float16 or float32")
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype: unsupported {dtype!r}; use one of auto, bfloat16, float16, float32") from None


DEFAULT_MAX_LORAS = 8


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to serve and how: ``model`` is a path (HF dir or .gguf) or a known alias."""

    model: str
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    seed: int = 0
    quantization: str | None = None  # weight-only: "int8" | "int4" (decoder projections)
    deterministic: bool = False  # batch-invariant: a request's tokens do not depend on what shares its steps

    @property
    def row_tile(self) -> int:
        """Rows per GEMM call in deterministic mode (0 = off): one fixed kernel shape for every token."""
        return BATCH_INVARIANT_TILE if self.deterministic else 0


# --deterministic runs every token-row GEMM on tiles of this many rows (zero-padded): a batch-1 decode pays this
# many rows of compute, a CPU GEMM at 8 rows still streams its weights at about the GEMV's cost.
BATCH_INVARIANT_TILE = 8


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry: ``num_blocks`` blocks of ``block_size`` token slots per layer; full blocks of
    computed K/V are reused by later requests with the same prefix and adapter (``enable_prefix_caching``)."""

    block_size: int = 16
    num_blocks: int = 0
    enable_prefix_caching: bool = True

    @property
    def num_slots(self) -> int:
        return self.block_size * self.num_blocks


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits: sequences per step, tokens per step (prefill chunks + decodes) and the longest
    sequence (prompt + output; ``None`` where the user gives it = the model's own limit)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter capacity: ``max_loras`` device slots (distinct adapters in one step), ``max_cpu_loras`` host-cached
    adapters, rank cap. Unset, ``max_loras`` is ``DEFAULT_MAX_LORAS`` but never more than ``max_cpu_loras`` (so a
    vLLM command line with ``--max-cpu-loras 2`` alone starts), and ``max_cpu_loras`` is twice ``max_loras``."""

    max_loras: int | None = None
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras is None:
            cap = DEFAULT_MAX_LORAS if self.max_cpu_loras is None else min(DEFAULT_MAX_LORAS, self.max_cpu_loras)
            object.__setattr__(self, "max_loras", max(cap, 1))
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): every "
                             "adapter in a device slot also needs a place in the host cache")

    @property
    def host_capacity(self) -> int:
        return 2 * self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, one section per layer."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig | None = None
