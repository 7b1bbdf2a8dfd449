"""The adapter store (memory management): registry → host cache → device slots.

- registry: every known adapter by name (metadata only: path and id) — thousands cost nothing;
- host cache: validated weights in RAM, LRU, at most ``max_cpu_loras``;
- device slots: ``max_loras`` slots in the model's LoRA buffers, LRU; a slot whose adapter is used by a running
  request (``refcount > 0``) is never evicted, and such an adapter is never unloaded.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from loraplex.lora.demo import resolve_adapter_path
from loraplex.lora.peft_format import LoRAPlan, LoRAWeights, inspect_peft_lora, read_lora
from loraplex.lora.request import LoRARequest
from loraplex.models.model_config import ModelSpec


@dataclass
class AdapterEntry:
    """Registry row: metadata and the validated plan (tensor names, ranks, scales) — no weights."""

    name: str
    path: str
    lora_int_id: int
    plan: LoRAPlan


class AdapterStore:
    def __init__(self, spec: ModelSpec, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 dtype: torch.dtype, write_slot) -> None:
        self.spec = spec
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.dtype = dtype
        self._write_slot = write_slot  # (slot, LoRAWeights) -> None: copies into the model's buffers
        self.registry: dict[str, AdapterEntry] = {}
        self.host: OrderedDict[str, LoRAWeights] = OrderedDict()
        self.slots: OrderedDict[str, int] = OrderedDict()  # name -> device slot, least recently used first
        self.refcount: Counter[str] = Counter()
        self.num_loads = 0
        self.num_evictions = 0

    # ---- registry -----------------------------------------------------------------------------------------
    def register(self, req: LoRARequest) -> AdapterEntry:
        """Know an adapter by name (idempotent for the same path; a name cannot change its path while known)."""
        path = resolve_adapter_path(req.lora_path)
        entry = self.registry.get(req.lora_name)
        if entry is not None:
            if entry.path != path:
                raise ValueError(f"lora_request: adapter {req.lora_name!r} is already loaded from {entry.path}")
            return entry
        # Validate now from the config and the safetensors header (a bad adapter fails its own request only);
        # the weights are read when a request first needs them.
        plan = inspect_peft_lora(req.lora_name, path, self.spec, self.max_lora_rank)
        entry = self.registry[req.lora_name] = AdapterEntry(req.lora_name, path, req.lora_int_id, plan)
        return entry

    def tier(self, name: str) -> str:
        return "device" if name in self.slots else "host" if name in self.host else "disk"

    def describe(self) -> list[dict]:
        """One row per known adapter: name, path, id, rank, tier (device/host/disk), in-flight requests."""
        return [{"name": e.name, "path": e.path, "lora_int_id": e.lora_int_id,
                 "rank": e.plan.rank, "tier": self.tier(e.name),
                 "in_flight": self.refcount[e.name]} for e in self.registry.values()]

    def unload(self, name: str) -> None:
        if name not in self.registry:
            raise KeyError(f"adapter {name!r} is not loaded")
        if self.refcount[name] > 0:
            raise RuntimeError(f"adapter {name!r} has {self.refcount[name]} requests in flight")
        self.registry.pop(name, None)
        self.host.pop(name, None)
        self.slots.pop(name, None)

    # ---- tiers --------------------------------------------------------------------------------------------
    def host_weights(self, name: str) -> LoRAWeights:
        w = self.host.get(name)
        if w is None:
            w = read_lora(self.registry[name].plan, self.dtype)
            self.host[name] = w
            while len(self.host) > self.max_cpu_loras:
                victim = next((n for n in self.host if n not in self.slots), None)
                if victim is None:
                    break
                del self.host[victim]
        self.host.move_to_end(name)
        return w

    def activate(self, names: set[str]) -> dict[str, int]:
        """Make ``names`` (≤ max_loras) resident in device slots; returns name -> slot."""
        assert len(names) <= self.max_loras, "the scheduler admits at most max_loras distinct adapters"
        for name in names:
            if name in self.slots:
                self.slots.move_to_end(name)
                continue
            used = set(self.slots.values())
            free = next((s for s in range(self.max_loras) if s not in used), None)
            if free is None:
                victim = next(n for n in self.slots if n not in names and self.refcount[n] == 0)
                free = self.slots.pop(victim)
                self.num_evictions += 1
            self._write_slot(free, self.host_weights(name))
            self.slots[name] = free
            self.num_loads += 1
        return {n: self.slots[n] for n in names}
