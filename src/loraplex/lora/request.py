"""``LoRARequest`` with vLLM's names and positional order (pure Python)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

_auto_ids = itertools.count(1 << 30)


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter serves a request: ``LoRARequest(lora_name, lora_int_id, lora_path)``.

    ``lora_local_path=`` (older vLLM scripts) is accepted for ``lora_path``; ``lora_int_id`` is optional.
    """

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""
    lora_local_path: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.lora_path and self.lora_local_path:
            object.__setattr__(self, "lora_path", self.lora_local_path)
        if not self.lora_path:
            raise ValueError(f"lora_path: LoRARequest {self.lora_name!r} needs the adapter's directory")
        if not self.lora_int_id:
            object.__setattr__(self, "lora_int_id", next(_auto_ids))


class UsesAdapters:
    """Mixin for records carrying ``lora_name`` (one adapter or None), ``lora_mix`` (a weighted set) or ``xlora``
    (an X-LoRA, whose experts ``xlora_experts`` are mixed per token by its classifier)."""

    lora_name: str | None
    lora_mix: tuple[tuple[str, float], ...]
    xlora: str | None
    xlora_experts: tuple[str, ...]

    @property
    def loras(self) -> tuple[tuple[str, float], ...]:
        """``(adapter, weight)`` pairs: one pair for a single adapter, several for a mixture, none for the base."""
        return self.lora_mix or (((self.lora_name, 1.0),) if self.lora_name is not None else ())

    @property
    def lora_names(self) -> tuple[str, ...]:
        """Every adapter that needs a device slot for this record (an X-LoRA's experts included)."""
        return tuple(n for n, _ in self.loras) + self.xlora_experts

    def kv_ids(self, request_id: str) -> tuple[str, ...]:
        """Block-table keys: the request's own, plus the scaling pass's KV track for an X-LoRA."""
        return (request_id, f"{request_id}/xlora-scaling") if self.xlora else (request_id,)
