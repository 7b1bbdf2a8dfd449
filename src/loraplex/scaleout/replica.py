"""One engine replica: the single-node loraplex app (``server.app``) in a Serve replica, its adapters multiplexed.

The ingress forwards each HTTP request as a :class:`ForwardedRequest`; the replica first makes the request's
adapters resident through Serve's multiplexed loader (an LRU of ``max_num_models_per_replica`` adapter handles),
then runs the request through its own FastAPI app — the same routes, validation and errors as ``loraplex serve`` —
and streams the response back: ``ResponseStart`` first, then body chunks as the app sends them (SSE included).

Adapters live in the cluster's catalog (``catalog.py``); a replica registers one in its engine only when a request
needs it and follows the catalog (a long poll) to drop adapters unloaded cluster-wide.

NOTE: an adapter unloaded cluster-wide leaves its (released) handle in Serve's LRU until it ages out: Serve offers no
way to drop one entry, so until then it counts toward "the replica holding the fewest" when Serve places a new id.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field

from ray import serve

from loraplex.lora.request import LoRARequest
from loraplex.scaleout.catalog import CatalogEntry, catalog_actor, split_model_id
from loraplex.server.adapters import not_found
from loraplex.server.app import build_app
from loraplex.server.errors import error_body, from_value_error
from loraplex.server.serve import build_state

log = logging.getLogger("loraplex.scaleout")
UNLOAD_RETRY_S = 0.05


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it, plus the multiplexed ids of the adapters it needs."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    adapters: tuple[str, ...] = ()  # "name@gen" ids, made resident before the app sees the request


@dataclass(frozen=True)
class ResponseStart:
    """The first item of a replica's response stream; body chunks (``bytes``) follow."""

    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class AdapterHandle:
    """What Serve's multiplex LRU holds for one adapter on one replica. Evicting it (Serve calls ``__del__`` from
    a worker thread, then Python may call it again when the object is collected) asks the replica to drop the
    adapter once no request uses it: idempotent, and a no-op if the replica registered the name again since."""

    def __init__(self, replica: "EngineReplica", entry: CatalogEntry) -> None:
        self.replica, self.entry, self.released = replica, entry, False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            self.replica.loop.call_soon_threadsafe(self.replica.evict, self.entry)
        except RuntimeError:  # the replica's event loop is closed: the engine is gone with it
            pass

    def __del__(self) -> None:
        self.release()


class EngineReplica:
    """A Serve deployment class: one ``LLMEngine`` behind the single-node app. ``argv`` are ``loraplex serve``
    flags (adapters come from the catalog, not from ``--lora-modules``); ``catalog``: its actor's (name, namespace)."""

    async def __init__(self, args, catalog: tuple[str, str]) -> None:
        self.state = build_state(args)
        self.app = build_app(self.state, args.max_body_bytes)
        self.state.engine.start()  # the app's lifespan is not run: requests are called on it directly
        self.loop = asyncio.get_running_loop()
        self.catalog = catalog_actor(*catalog)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.held: dict[str, int] = {}  # adapter name → generation registered in this engine
        self.using: Counter[str] = Counter()  # forwarded requests between "resident" and the end of the response
        self.loads = 0
        self.version = 0
        self._sync_task = asyncio.ensure_future(self._follow_catalog())

    # ---- adapters ---------------------------------------------------------------------------------------------
    async def adapter(self, model_id: str) -> AdapterHandle:  # replaced by Serve's multiplexed LRU: lru_replica()
        return await self._load(model_id)

    async def _load(self, model_id: str) -> AdapterHandle:
        """Register adapter ``name@gen`` from the catalog in this engine (raises ``LookupError`` when the catalog
        no longer has that generation)."""
        name, gen = split_model_id(model_id)
        entry = await self.catalog.entry.remote(name)
        if entry is None or entry.gen != gen:
            raise LookupError(name)
        if self.held.get(name) != gen:
            await self.state.engine.load_adapter(LoRARequest(name, lora_path=entry.path),
                                                 inplace=self.state.engine.has_adapter(name))
            self.held[name] = gen
            self.loads += 1
        return AdapterHandle(self, entry)

    def evict(self, entry: CatalogEntry) -> None:
        """Serve's LRU let go of ``entry``: drop it unless the same generation was loaded again meanwhile."""
        if self.held.get(entry.name) == entry.gen:
            asyncio.ensure_future(self._drop(entry.name, entry.gen))

    async def _drop(self, name: str, gen: int) -> None:
        """Unregister ``name`` once no request uses it (in-flight requests finish on it); idempotent."""
        while self.held.get(name) == gen:
            if self.using[name] == 0:
                try:
                    await self.state.engine.unload_adapter(name)
                except RuntimeError:  # queued or running requests still use it
                    pass
                except KeyError:  # already gone
                    pass
                else:
                    self.held.pop(name, None)
                    return
            await asyncio.sleep(UNLOAD_RETRY_S)

    async def _follow_catalog(self) -> None:
        """Report to the catalog and apply its changes: adapters removed (or re-registered) are dropped here."""
        while True:
            try:
                version, entries = await self.catalog.sync.remote(
                    self.replica_id, self.version, sorted(self.held), self.loads, self.state.metrics.render().decode())
                stale = [(n, g) for n, g in self.held.items() if n not in entries or entries[n].gen != g]
                await asyncio.gather(*(self._drop(n, g) for n, g in stale))
                self.version = version
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the catalog restarting; try again
                log.exception("replica %s: catalog sync failed", self.replica_id)
                await asyncio.sleep(1.0)

    # ---- requests ---------------------------------------------------------------------------------------------
    async def __call__(self, req: ForwardedRequest):
        """Stream one forwarded request's response: ``ResponseStart``, then ``bytes`` chunks."""
        names = [split_model_id(m)[0] for m in req.adapters]
        self.using.update(names)
        try:
            for model_id in req.adapters:
                try:
                    await self.adapter(model_id)
                except LookupError:  # unloaded cluster-wide between the ingress' check and now
                    err = not_found(split_model_id(model_id)[0])
                except (ValueError, FileNotFoundError) as e:  # its files changed since the load check
                    err = from_value_error(e)
                else:
                    continue
                yield ResponseStart(err.status, [(b"content-type", b"application/json"),
                                                 (b"x-loraplex-replica", self.replica_id.encode())])
                yield _json(error_body(err.status, err.message, err.param, err.code))
                return
            async for item in self._run_app(req):
                yield item
        finally:
            self.using.subtract(names)

    async def _run_app(self, req: ForwardedRequest):
        """Call the ASGI app; a closed generator (the client left) is a disconnect, which aborts the request."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req.method,
                 "scheme": "http", "path": req.path, "raw_path": req.path.encode(), "query_string": req.query,
                 "root_path": "", "headers": req.headers,
                 "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
        sent: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body = [{"type": "http.request", "body": req.body, "more_body": False}]

        async def receive():
            if body:
                return body.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(self.app(scope, receive, sent.put))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while (msg := await sent.get()) is not None:
                if msg["type"] == "http.response.start":
                    headers = [*msg.get("headers", []), (b"x-loraplex-replica", self.replica_id.encode())]
                    yield ResponseStart(msg["status"], headers)
                elif msg.get("body"):
                    yield msg["body"]
            task.result()  # an exception the app did not turn into a response
        finally:
            gone.set()
            if not task.done():
                await asyncio.wait({task}, timeout=5)

    # ---- asked by the ingress --------------------------------------------------------------------------------------
    async def base_info(self) -> dict:
        """The base's served names (the first is the id), model path and max_model_len."""
        st = self.state
        return {"names": list(st.resolver.base_names), "model_path": st.model_path,
                "max_model_len": st.engine.max_model_len}

    async def check(self, name: str, path: str) -> str | None:
        """Validate an adapter fully (config, ranks and shapes against the base, every tensor) without registering
        it: None when it can be served, else why not."""
        try:
            await self.state.engine.check_adapter(name, path)
        except (ValueError, FileNotFoundError) as e:
            return str(e)
        return None

    def __del__(self) -> None:  # Serve's graceful shutdown
        self._sync_task.cancel()
        self.state.engine.shutdown()


def lru_replica(max_adapters: int) -> type[EngineReplica]:
    """``EngineReplica`` whose ``adapter(model_id)`` is Serve's multiplexed LRU of ``max_adapters`` handles per
    replica (Serve routes a request to a replica that holds its id, else to the one with the fewest)."""

    class LoraplexReplica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, model_id: str) -> AdapterHandle:
            return await self._load(model_id)

    return LoraplexReplica


def _json(obj) -> bytes:
    import json

    return json.dumps(obj).encode()
