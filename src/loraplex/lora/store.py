"""The adapter store (memory management): registry → host cache → device slots.

- registry: every known adapter by name (metadata only: path and id) — thousands cost nothing;
- host cache: validated weights in RAM, LRU, at most ``max_cpu_loras``;
- device slots: ``max_loras`` slots in the model's LoRA buffers, LRU.

The store is the scheduler's :class:`~loraplex.lora.residency.AdapterResidency`: a running request *holds* its
adapters (``hold`` reads them into the host cache; ``release`` when it stops), and a held adapter is evicted from
neither tier nor unloaded. Pinned adapters keep their slot between requests and count against ``max_loras`` in
``can_hold``. The engine makes a step's adapters resident (``activate``) before the forward. Prefetch reads the
adapters of queued requests from disk on a background thread and puts them in free device slots, so a request
rarely waits for its adapter's I/O.
"""
from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loraplex.layers.projections import ModuleShapes
from loraplex.lora.demo import resolve_adapter_path
from loraplex.lora.peft_format import (
    LoRAPlan,
    LoRAWeights,
    inspect_peft_lora,
    read_lora,
)
from loraplex.lora.request import LoRARequest
from loraplex.lora.residency import AdapterUnreadable
from loraplex.lora.xlora import (
    XLoRAPlan,
    check_classifier,
    inspect_xlora,
    is_xlora_dir,
    module_order,
)


@dataclass
class AdapterEntry:
    """Registry row: metadata and the validated plan (tensor names, ranks, scales) — no weights.

    An X-LoRA's row has ``xlora`` (config + classifier) and no ``plan``: its experts are rows of their own, named
    ``<name>/<expert>``, and only they take device slots."""

    name: str
    path: str
    lora_int_id: int
    plan: LoRAPlan | None
    xlora: XLoRAPlan | None = None
    digest: str | None = None  # sha256 of its config and weights, computed on first use (prefix-cache identity)


class AdapterStore:
    """Adapters by name across the three tiers; implements ``AdapterResidency`` for the scheduler."""

    def __init__(self, shapes: ModuleShapes, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 dtype: torch.dtype, write_slot) -> None:
        self.shapes = shapes
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.dtype = dtype
        self._write_slot = write_slot  # (slot, LoRAWeights) -> None: copies into the model's buffers
        self.registry: dict[str, AdapterEntry] = {}
        self.host: OrderedDict[str, LoRAWeights] = OrderedDict()
        self.slots: OrderedDict[str, int] = OrderedDict()  # name -> device slot, least recently used first
        self.refcount: Counter[str] = Counter()  # held adapters: running requests using each
        self.pinned: set[str] = set()
        self._pending: dict[str, Future] = {}  # prefetches: name -> future LoRAWeights
        self._io: ThreadPoolExecutor | None = None
        self.loads: Counter[str] = Counter()  # per adapter: disk/host -> device slot
        self.evictions: Counter[str] = Counter()

    # ---- registry -----------------------------------------------------------------------------------------
    def register(self, req: LoRARequest) -> AdapterEntry:
        """Know an adapter by name (idempotent for the same path; a name cannot change its path while known)."""
        path = resolve_adapter_path(req.lora_path)
        entry = self.registry.get(req.lora_name)
        if entry is not None:
            if entry.path != path:
                raise ValueError(f"lora_request: adapter {req.lora_name!r} is already loaded from {entry.path}")
            return entry
        if is_xlora_dir(path):
            return self._register_xlora(req, path)
        # Validate now from the config and the safetensors header (a bad adapter fails its own request only);
        # the weights are read when a request first needs them.
        plan = inspect_peft_lora(req.lora_name, path, self.shapes, self.max_lora_rank)
        entry = self.registry[req.lora_name] = AdapterEntry(req.lora_name, path, req.lora_int_id, plan)
        return entry

    def _register_xlora(self, req: LoRARequest, path: str) -> AdapterEntry:
        xplan = inspect_xlora(req.lora_name, path, self.shapes.hidden_size)
        if len(xplan.config.experts) > self.max_loras:
            raise ValueError(f"adapter {req.lora_name!r}: an X-LoRA of {len(xplan.config.experts)} experts needs as "
                             f"many device slots; max_loras is {self.max_loras}")
        plans = {n: inspect_peft_lora(n, p, self.shapes, self.max_lora_rank)
                 for n, p in zip(xplan.expert_names(), xplan.expert_paths.values())}
        xplan = replace(xplan, modules=tuple(module_order(list(plans.values()))))
        check_classifier(xplan, len(xplan.modules))
        for n, plan in plans.items():  # experts are adapters in their own right (requestable by name)
            if n in self.registry and self.registry[n].path != plan.path:
                raise ValueError(f"adapter {n!r} is already loaded from {self.registry[n].path}")
            self.registry.setdefault(n, AdapterEntry(n, plan.path, 0, plan))
        entry = self.registry[req.lora_name] = AdapterEntry(req.lora_name, path, req.lora_int_id, None, xplan)
        return entry

    def digest(self, name: str) -> str:
        """The content digest of an adapter's config and weights: the same weights under another name or path give
        the same digest, other weights under the same name another one."""
        entry = self._known(name)
        if entry.digest is None:
            h = hashlib.sha256()
            for f in (Path(entry.path) / "adapter_config.json", Path(entry.plan.file)):
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            entry.digest = h.hexdigest()
        return entry.digest

    def expand(self, names) -> list[str]:
        """Adapter names with each X-LoRA replaced by its experts (what takes slots and weights)."""
        out: list[str] = []
        for n in names:
            entry = self.registry.get(n)
            out += entry.xlora.expert_names() if entry is not None and entry.xlora is not None else [n]
        return out

    @property
    def num_loads(self) -> int:
        return self.loads.total()

    @property
    def num_evictions(self) -> int:
        return self.evictions.total()

    def tier(self, name: str) -> str:
        """device / host / disk (an X-LoRA: the slowest tier of its experts)."""
        tiers = ["device" if n in self.slots else "host" if n in self.host else "disk" for n in self.expand([name])]
        return max(tiers, key=["device", "host", "disk"].index)

    def rank(self, name: str) -> int:
        return max(self.registry[n].plan.rank for n in self.expand([name]))

    def targets(self, name: str) -> list[str]:
        """The projections an adapter (or an X-LoRA's experts) adapts, e.g. ``["q_proj", "v_proj"]``."""
        return sorted({entry.module for n in self.expand([name]) for entry in self.registry[n].plan.entries})

    def describe(self) -> list[dict]:
        """One row per known adapter: name, path, id, rank, targets, tier (device/host/disk), in-flight requests;
        X-LoRAs also list their experts."""
        return [{"name": e.name, "path": e.path, "lora_int_id": e.lora_int_id, "rank": self.rank(e.name),
                 "targets": self.targets(e.name), "tier": self.tier(e.name),
                 "pinned": set(self.expand([e.name])) <= self.pinned,
                 "in_flight": self.refcount.get(e.name, 0),
                 **({"xlora_experts": list(e.xlora.expert_names())} if e.xlora else {})}
                for e in self.registry.values()]

    def _known(self, name: str) -> AdapterEntry:
        entry = self.registry.get(name)
        if entry is None:
            raise KeyError(f"adapter {name!r} is not loaded")
        return entry

    def xlora_owner(self, name: str) -> str | None:
        """The X-LoRA that ``name`` is an expert of, if any."""
        return next((e.name for e in self.registry.values() if e.xlora and name in e.xlora.expert_names()), None)

    def unload(self, name: str) -> None:
        """Forget an adapter (an X-LoRA: with its experts)."""
        self._known(name)
        if (owner := self.xlora_owner(name)) is not None:
            raise RuntimeError(f"adapter {name!r} is an expert of the X-LoRA {owner!r}; unload {owner!r} instead")
        names = {name, *self.expand([name])}
        if busy := {n: self.refcount[n] for n in names if n in self.refcount}:
            raise RuntimeError(f"adapter {name!r} has {max(busy.values())} requests in flight")
        for n in names:
            self.registry.pop(n, None)
            self.host.pop(n, None)
            self.slots.pop(n, None)
            self.pinned.discard(n)
            self._pending.pop(n, None)

    def retire(self, name: str, alias: str) -> None:
        """Keep ``name``'s adapter, under ``alias``, for the requests that already use it (their tiers, slot and
        holds move with it), so that ``name`` can be registered again with other weights (``load_inplace``)."""
        entry = self._known(name)
        if entry.xlora is not None or self.xlora_owner(name) is not None:
            raise ValueError(f"load_inplace: adapter {name!r} is (part of) an X-LoRA; unload it, then load it again")
        del self.registry[name]
        self.registry[alias] = AdapterEntry(alias, entry.path, entry.lora_int_id, replace(entry.plan, name=alias),
                                            digest=entry.digest)
        for tier in (self.host, self.slots, self.refcount):
            if name in tier:
                tier[alias] = tier.pop(name)
        self._pending.pop(name, None)
        self.pinned.discard(name)

    def pin(self, name: str) -> None:
        """Keep ``name`` in a device slot until :meth:`unpin`; at most ``max_loras - 1`` pins, so other adapters
        still get a slot. The slot is taken now when one is free or evictable, else as soon as one is."""
        self._known(name)
        names = self.expand([name])  # an X-LoRA pins its experts
        if len(self.pinned | set(names)) > self.max_loras - 1:
            raise ValueError(f"max_loras: {len(self.pinned)} of {self.max_loras} slots are pinned already; "
                             "pinning more would leave no slot for the other adapters")
        for n in names:
            self.pinned.add(n)
            if n not in self.slots and (self._free_slot() is not None or self._victim(exclude=set()) is not None):
                self.activate({n})

    def unpin(self, name: str) -> None:
        self._known(name)
        self.pinned.difference_update(self.expand([name]))
        self._trim_host()

    # ---- residency (asked by the scheduler) ----------------------------------------------------------------
    def can_hold(self, names: Set[str]) -> bool:
        new = set(names) - self.refcount.keys()
        return not new or len(self.refcount.keys() | self.pinned | new) <= self.max_loras

    def hold(self, names: Set[str]) -> None:
        for i, name in enumerate(names := sorted(names)):
            try:
                self.host_weights(name)
            except Exception as e:  # noqa: BLE001 - any failure to read fails the request that needs it
                self.release(names[:i])
                raise AdapterUnreadable(f"lora_request: adapter {name!r} could not be read: {e}") from e
            self.refcount[name] += 1

    def release(self, names: Set[str]) -> None:
        for name in names:
            self.refcount[name] -= 1
            if self.refcount[name] <= 0:
                del self.refcount[name]
        self._trim_host()

    # ---- tiers --------------------------------------------------------------------------------------------
    def host_weights(self, name: str) -> LoRAWeights:
        w = self.host.get(name)
        if w is None:
            pending = self._pending.pop(name, None)
            w = pending.result() if pending is not None else read_lora(self.registry[name].plan, self.dtype)
            self.host[name] = w
            self._trim_host(keep=name)
        self.host.move_to_end(name)
        return w

    def _trim_host(self, keep: str | None = None) -> None:
        """Drop least recently used host entries beyond ``max_cpu_loras``: never ``keep`` (being admitted), nor an
        adapter that is held, in a device slot or pinned (the tier may overflow rather than lose those)."""
        while len(self.host) > self.max_cpu_loras and (victim := self._host_victim(keep)) is not None:
            del self.host[victim]

    def _host_victim(self, keep: str | None) -> str | None:
        return next((n for n in self.host if n != keep and n not in self.slots and n not in self.refcount
                     and n not in self.pinned), None)

    def activate(self, names: Set[str]) -> dict[str, int]:
        """Make ``names`` (≤ max_loras, held or pinned) resident in device slots; returns name -> slot."""
        assert len(names) <= self.max_loras, "the scheduler admits at most max_loras distinct adapters"
        for name in names:
            if name in self.slots:
                self.slots.move_to_end(name)
                continue
            free = self._free_slot()
            if free is None:
                victim = self._victim(exclude=names)
                assert victim is not None, "the scheduler keeps running ∪ pinned adapters within max_loras"
                free = self.slots.pop(victim)
                self.evictions[victim] += 1
            self._load(name, free)
        self._trim_host()  # an adapter that just left its slot may now leave the host tier too
        return {n: self.slots[n] for n in names}

    def _free_slot(self) -> int | None:
        used = set(self.slots.values())
        return next((s for s in range(self.max_loras) if s not in used), None)

    def _victim(self, exclude: Set[str]) -> str | None:
        """The least recently used resident adapter that no running request holds and nobody pinned."""
        return next((n for n in self.slots if n not in exclude and n not in self.pinned and n not in self.refcount),
                    None)

    def _load(self, name: str, slot: int) -> None:
        self._write_slot(slot, self.host_weights(name))
        self.slots[name] = slot
        self.loads[name] += 1

    def prefetch(self, names: list[str]) -> None:
        """Called every step with the adapters of queued requests (and the pinned ones): start reading those on disk
        in the background; put those already read into free device slots (never evicting anything)."""
        names = self.expand(names)
        for name in names:
            if name in self.slots or name in self.host or name in self._pending or name not in self.registry:
                continue
            if self._io is None:
                self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-prefetch")
            self._pending[name] = self._io.submit(read_lora, self.registry[name].plan, self.dtype)
        for name in [n for n, f in self._pending.items() if f.done()]:
            if self._pending[name].exception() is not None:  # read again (and fail) when a request needs it
                del self._pending[name]
                continue
            if len(self.host) >= self.max_cpu_loras and self._host_victim(keep=None) is None:
                del self._pending[name]  # the host tier is full of adapters in use: read again at admission
                continue
            self.host_weights(name)  # into the host LRU (which bounds what prefetching can hold)
        for name in names:
            free = self._free_slot()
            if free is None:
                break
            if name in self.host and name not in self.slots:
                self._load(name, free)
