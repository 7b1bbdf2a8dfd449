"""Frozen configuration dataclasses composed into :class:`EngineConfig`.

Each layer of the engine reads only its own section; derived values are properties, never stored twice.
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
    """Map a user-facing dtype name (vLLM spelling; ``"auto"`` = bf16) to a torch dtype."""
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


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to serve and how: ``model`` is a path (HF dir or .gguf) or a known alias."""

    model: str
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    max_model_len: int = 2048
    seed: int = 0


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry: ``num_blocks`` blocks of ``block_size`` token slots per layer."""

    block_size: int = 16
    num_blocks: int = 0

    @property
    def num_slots(self) -> int:
        return self.block_size * self.num_blocks


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits: sequences per step and tokens per step (prefill chunks + decodes)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    max_loras: int = 0  # distinct adapters among running requests (0 = LoRA disabled)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter capacity: ``max_loras`` device slots, ``max_cpu_loras`` host-cached adapters, rank cap."""

    max_loras: int = 4
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, one section per layer."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig | None = None
