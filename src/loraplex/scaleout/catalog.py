"""The cluster's adapter catalog: which adapters the whole deployment serves, one copy for every replica.

A load or unload at the ingress changes the catalog; each replica follows it through a long poll (``sync``) and
acknowledges the version it has applied, so an unload can wait until every live replica has dropped the adapter.
Each registration gets a new generation: the multiplexed model id is ``name@gen``, so an adapter unloaded and
loaded again (perhaps from another path) is a new model to Serve's per-replica LRU, never a stale cache hit.

``AdapterCatalog`` is the pure-Python core (tested without Ray); ``CatalogActor`` puts it in an async Ray actor.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

LIVE_S = 5.0  # a replica not heard from for this long is taken for dead (it polls at least every SYNC_POLL_S)
SYNC_POLL_S = 1.0


@dataclass(frozen=True)
class CatalogEntry:
    """One adapter served cluster-wide: its files and the card given at load time (if any)."""

    name: str
    path: str
    gen: int
    description: str | None = None
    examples: tuple[str, ...] | None = None

    @property
    def model_id(self) -> str:
        """The id Serve multiplexes on: a new registration is a new id."""
        return f"{self.name}@{self.gen}"


def split_model_id(model_id: str) -> tuple[str, int]:
    """``"law@3"`` → ``("law", 3)``; ``ValueError`` for anything else."""
    name, sep, gen = model_id.rpartition("@")
    if not sep or not name or not gen.isdigit():
        raise ValueError(f"multiplexed model id {model_id!r} is not NAME@GENERATION")
    return name, int(gen)


@dataclass
class ReplicaReport:
    """What a replica last told the catalog: the version it applied, the adapters its engine holds, its metrics."""

    acked: int = 0
    held: tuple[str, ...] = ()
    loads: int = 0
    metrics: str = ""
    seen: float = field(default_factory=time.monotonic)


class AdapterCatalog:
    """Adapters by name (versioned) and the replicas' reports. Each change bumps ``version``."""

    def __init__(self) -> None:
        self.entries: dict[str, CatalogEntry] = {}
        self.version = 0
        self._gen = 0
        self.replicas: dict[str, ReplicaReport] = {}

    def add(self, name: str, path: str, description: str | None = None,
            examples: list[str] | None = None) -> CatalogEntry:
        """Register (or replace) ``name``: a new generation either way."""
        self._gen += 1
        self.version += 1
        entry = CatalogEntry(name, path, self._gen, description, tuple(examples) if examples else None)
        self.entries[name] = entry
        return entry

    def ensure(self, name: str, path: str, description: str | None = None,
               examples: list[str] | None = None) -> CatalogEntry:
        """``name``'s entry, added first if absent (concurrent first uses agree on one generation)."""
        return self.entries.get(name) or self.add(name, path, description, examples)

    def remove(self, name: str) -> int | None:
        """Drop ``name``; the version replicas must reach to have dropped it, or None when it was unknown."""
        if self.entries.pop(name, None) is None:
            return None
        self.version += 1
        return self.version

    def entry(self, name: str) -> CatalogEntry | None:
        return self.entries.get(name)

    def report(self, replica: str, acked: int, held: list[str], loads: int, metrics: str) -> None:
        self.replicas[replica] = ReplicaReport(acked, tuple(held), loads, metrics, time.monotonic())

    def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def live(self, now: float | None = None) -> dict[str, ReplicaReport]:
        now = time.monotonic() if now is None else now
        return {r: rep for r, rep in self.replicas.items() if now - rep.seen <= LIVE_S}

    def lagging(self, version: int) -> list[str]:
        """Live replicas that have not applied ``version`` yet."""
        return sorted(r for r, rep in self.live().items() if rep.acked < version)


class CatalogActor:
    """The catalog in an async Ray actor (one per application, named). Replicas long-poll ``sync``; the ingress
    calls ``add`` / ``remove`` and waits on ``wait_applied``."""

    def __init__(self) -> None:
        self.catalog = AdapterCatalog()
        self._changed = asyncio.Condition()

    async def _bump(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def add(self, name: str, path: str, description: str | None = None,
                  examples: list[str] | None = None) -> CatalogEntry:
        entry = self.catalog.add(name, path, description, examples)
        await self._bump()
        return entry

    async def ensure(self, name: str, path: str, description: str | None = None,
                     examples: list[str] | None = None) -> CatalogEntry:
        before = self.catalog.version
        entry = self.catalog.ensure(name, path, description, examples)
        if self.catalog.version != before:
            await self._bump()
        return entry

    async def remove(self, name: str) -> int | None:
        version = self.catalog.remove(name)
        await self._bump()
        return version

    async def entry(self, name: str) -> CatalogEntry | None:
        return self.catalog.entry(name)

    async def entries(self) -> dict[str, CatalogEntry]:
        return dict(self.catalog.entries)

    async def replicas(self) -> dict[str, ReplicaReport]:
        return self.catalog.live()

    async def forget(self, replica: str) -> None:
        self.catalog.forget(replica)
        await self._bump()

    async def sync(self, replica: str, acked: int, held: list[str], loads: int, metrics: str,
                   timeout: float = SYNC_POLL_S) -> tuple[int, dict[str, CatalogEntry]]:
        """A replica's report, then (once the catalog is newer than ``acked``, or after ``timeout``) the current
        version and entries."""
        self.catalog.report(replica, acked, held, loads, metrics)
        await self._bump()  # an ingress may be waiting for this ack
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.catalog.version > acked), timeout)
            except asyncio.TimeoutError:
                pass
        return self.catalog.version, dict(self.catalog.entries)

    async def wait_applied(self, version: int, timeout: float) -> list[str]:
        """Wait until every live replica applied ``version``; the replicas still behind after ``timeout``."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: not self.catalog.lagging(version)), timeout)
            except asyncio.TimeoutError:
                pass
        return self.catalog.lagging(version)


def catalog_actor(name: str, namespace: str):
    """The application's catalog actor, created by whoever asks first (the ingress or a replica)."""
    import ray

    return ray.remote(CatalogActor).options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached",
                                            num_cpus=0, max_concurrency=1000).remote()
