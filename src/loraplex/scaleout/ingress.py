"""The cluster's HTTP front (a Serve ingress): resolves which adapter a request needs, routes ``model: "auto"``
once, and forwards the request to an engine replica — with Serve's multiplexed model id, so a replica that holds
the adapter gets it (affinity), else the one holding the fewest. The replica answers with the single-node app's
own routes; the ingress streams the answer back (SSE included).

Cluster-wide routes live here: adapter load / unload change the catalog (so every replica follows), ``/v1/models``
lists the catalog, ``/metrics`` is every replica's metrics with a ``replica`` label.
"""

import asyncio
import json
import logging
import time
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve

from loraplex.lora.demo import demo_adapters, resolve_adapter_path
from loraplex.routing import AdapterCard
from loraplex.scaleout.catalog import CatalogEntry, catalog_actor
from loraplex.scaleout.metrics import merge_metrics
from loraplex.scaleout.replica import ForwardedRequest, ResponseStart
from loraplex.scaleout.requests import route_query, routed_body, wanted
from loraplex.server.adapters import not_found
from loraplex.server.auth import Denied, principal_for
from loraplex.server.errors import APIError, error_body, install_error_handlers, parse_body, read_json
from loraplex.server.protocol import LoadLoRARequest, UnloadLoRARequest
from loraplex.server.serve import build_router, parse_lora_module

log = logging.getLogger("loraplex.scaleout")
api = FastAPI(title="loraplex (Ray Serve)")
install_error_handlers(api)
UNLOAD_WAIT_S = 120.0
REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


@serve.ingress(api)
class Ingress:
    """Forwards to ``replicas`` (a handle to the engine deployment). ``affinity=False`` sends no multiplexed id:
    Serve's plain load-based choice (the benchmark's baseline); each replica still loads what it is asked for."""

    def __init__(self, replicas, args, catalog: tuple[str, str], affinity: bool = True) -> None:
        self.replicas, self.args, self.affinity = replicas, args, affinity
        self.catalog = catalog_actor(*catalog)
        self.router = build_router(args)
        self.auto_name = args.router_name
        self.adapter_dir = Path(args.adapter_dir).resolve() if args.adapter_dir else None
        self.started = time.time()
        self.base: dict | None = None  # the replicas' base names, model path, max_model_len (asked once)
        self.routed_cards: dict[str, int] = {}  # adapter → generation the router holds a card of

    def _guard(self, request: Request) -> None:
        """The same key rules as one server (``server.auth``): 401 without a valid key, open /health, /metrics."""
        try:
            principal_for(self.args.api_key, None, dict(request.headers.raw), request.method, request.url.path)
        except Denied as e:
            raise APIError(e.status, e.message,
                           headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None) from None

    async def _base(self) -> dict:
        if self.base is None:
            self.base = await self.replicas.base_info.remote()
            await self._seed()
        return self.base

    async def _seed(self) -> None:
        """Put ``--lora-modules`` (or, for the zero-argument demo run, the demo adapters) in the catalog."""
        mods = [parse_lora_module(s) for s in self.args.lora_modules]
        if not self.args.no_demo_adapters and self.args.model is None and not mods and not self.args.adapter_dir:
            mods = [{"name": n, "path": n} for n in demo_adapters()]
        for mod in mods:
            await self.catalog.ensure.remote(mod["name"], resolve_adapter_path(mod["path"]), mod.get("description"),
                                             mod.get("examples"))

    async def _entry(self, name: str, param: str) -> CatalogEntry:
        """The catalog's adapter ``name``; a folder under --adapter-dir joins the catalog on first use; else 404."""
        entry = await self.catalog.entry.remote(name)
        if entry is None and self.adapter_dir is not None and "/" not in name and ".." not in name:
            if (self.adapter_dir / name / "adapter_config.json").is_file():
                entry = await self.catalog.ensure.remote(name, str(self.adapter_dir / name))
        if entry is None:
            raise not_found(name, param)
        return entry

    # ---- generation: forwarded to a replica ---------------------------------------------------------------------
    @api.post("/v1/completions")
    @api.post("/v1/chat/completions")
    @api.post("/generate")
    @api.post("/generate_stream")
    @api.post("/")
    async def generate(self, request: Request):
        self._guard(request)
        base = await self._base()
        body = await read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        want = wanted(body, base["names"], self.auto_name)
        headers = {}
        if want.auto:
            choice, headers = await self._route(body, base["names"][0])
            body = routed_body(body, choice, base["names"][0], self.auto_name)
            want = wanted(body, base["names"], self.auto_name)
        entries = [await self._entry(name, param) for name, param in want.adapters]
        return await self._forward(request, json.dumps(body).encode(), entries, headers)

    async def _route(self, body: dict, base_id: str) -> tuple[str, dict]:
        """``model: "auto"``: the router's choice among the catalog's adapters, decided once, here."""
        entries = await self.catalog.entries.remote()
        for name in set(self.routed_cards) - set(entries):
            self.router.remove(name)
            del self.routed_cards[name]
        for name, e in entries.items():
            if self.routed_cards.get(name) != e.gen:
                card = AdapterCard.of(e.description, list(e.examples) if e.examples else None) or \
                    AdapterCard.from_folder(e.path)
                await self._off_loop(self.router.set_card, name, card)
                self.routed_cards[name] = e.gen
        decision = await self._off_loop(self.router.route, *route_query(body))
        log.info("route %s -> %s", self.auto_name, decision.summary())
        choice = decision.adapter if decision.adapter in entries else base_id
        return choice, {"x-loraplex-route-score": f"{decision.score:.4f}"}

    async def _off_loop(self, fn, *args):
        """The embedding scorer's forward passes run off the event loop (streams keep flowing meanwhile)."""
        return await asyncio.to_thread(fn, *args) if self.router.blocking else fn(*args)

    async def _forward(self, request: Request, body: bytes, entries: list[CatalogEntry],
                       extra: dict[str, str] | None = None) -> Response:
        """Send the request to a replica; one that died before answering is replaced by another (once)."""
        req = ForwardedRequest(request.method, request.url.path, request.url.query.encode(),
                               [(k, v) for k, v in request.headers.raw if k not in (b"content-length", b"host")]
                               + [(b"content-length", str(len(body)).encode())], body,
                               tuple(e.model_id for e in entries))
        handle = self.replicas.options(stream=True)
        if self.affinity and len(entries) == 1:
            handle = handle.options(multiplexed_model_id=entries[0].model_id)
        for attempt in range(2):
            stream = handle.remote(req)
            try:
                start: ResponseStart = await stream.__anext__()
                break
            except REPLICA_GONE as e:
                if attempt == 1:
                    raise APIError(503, f"no engine replica answered: {e}", code="replica_unavailable") from None
        headers = {k.decode(): v.decode() for k, v in start.headers if k.lower() != b"content-length"}
        headers.update(extra or {})
        if not headers.get("content-type", "").startswith("text/event-stream"):
            try:
                content = b"".join([chunk async for chunk in stream])
            except REPLICA_GONE as e:
                raise APIError(503, f"the engine replica failed during the request: {e}",
                               code="replica_unavailable") from None
            finally:  # the client left (this handler was cancelled): the replica aborts the request
                stream.cancel()
            return Response(content, start.status, headers=headers)

        async def relay():
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as e:  # noqa: BLE001 - the replica died mid-stream: only this request fails
                yield f"data: {json.dumps(error_body(503, f'the engine replica failed: {e}'))}\n\n".encode()
            finally:
                stream.cancel()

        return StreamingResponse(relay(), start.status, headers=headers)

    # ---- routes answered by any replica ---------------------------------------------------------------------------
    @api.get("/info")
    @api.get("/health")
    async def any_replica(self, request: Request):
        self._guard(request)
        await self._base()
        return await self._forward(request, b"", [])

    # ---- cluster-wide: the catalog ---------------------------------------------------------------------------------
    async def _model_cards(self) -> list[dict]:
        base = await self._base()
        created = int(self.started)
        data = [{"id": base["names"][0], "object": "model", "created": created, "owned_by": "loraplex",
                 "root": base["model_path"], "parent": None, "max_model_len": base["max_model_len"]}]
        for e in (await self.catalog.entries.remote()).values():
            data.append({"id": e.name, "object": "model", "created": created, "owned_by": "loraplex",
                         "root": e.path, "parent": base["names"][0], "max_model_len": None})
        return data

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        self._guard(request)
        return {"object": "list", "data": await self._model_cards()}

    @api.get("/v1/models/{model_id:path}")
    async def retrieve_model(self, model_id: str, request: Request):
        self._guard(request)
        base = await self._base()
        cards = await self._model_cards()
        if model_id in base["names"]:
            return cards[0]
        card = next((c for c in cards[1:] if c["id"] == model_id), None)
        if card is None:
            raise not_found(model_id)
        return card

    @api.get("/v1/lora_adapters")
    async def list_adapters(self, request: Request):
        """The catalog, each adapter with the replicas whose engines hold it now."""
        self._guard(request)
        entries = await self.catalog.entries.remote()
        reports = await self.catalog.replicas.remote()
        return {"object": "list", "data": [
            {"name": e.name, "path": e.path, "generation": e.gen,
             "replicas": sorted(r for r, rep in reports.items() if e.name in rep.held)} for e in entries.values()]}

    @api.get("/v1/replicas")
    async def list_replicas(self, request: Request):
        """Live replicas: the adapters their engines hold and how many adapter loads each has made."""
        self._guard(request)
        reports = await self.catalog.replicas.remote()
        return {"object": "list", "data": [{"id": r, "adapters": list(rep.held), "adapter_loads": rep.loads,
                                            "catalog_version": rep.acked} for r, rep in sorted(reports.items())]}

    @api.post("/v1/load_lora_adapter")
    @api.post("/load_lora_adapter")
    async def load_adapter(self, request: Request):
        """vLLM's load: checked fully on one replica (config, ranks, every tensor), then in the catalog."""
        self._guard(request)
        body = parse_body(LoadLoRARequest, await read_json(request))
        base = await self._base()
        name = body.lora_name
        if name in base["names"] or name == self.auto_name:
            raise APIError(400, f"lora_name: {name!r} is a reserved model name", "lora_name")
        if body.base_model_name and body.base_model_name not in base["names"]:
            raise APIError(400, f"base_model_name: this server serves {', '.join(sorted(base['names']))}, not "
                                f"{body.base_model_name!r}", "base_model_name")
        if body.pinned:
            raise APIError(400, "pinned: pinning is per engine; not available with --num-replicas", "pinned")
        folder = self.adapter_dir / name if self.adapter_dir and "/" not in name and ".." not in name else None
        path = body.lora_path or (str(folder) if folder and (folder / "adapter_config.json").is_file() else None) \
            or (name if name in demo_adapters() else None)
        if path is None:
            raise APIError(404, f"lora_path: no lora_path given and no adapter named {name!r} found (--adapter-dir, "
                                "demo adapters)", "lora_path", "adapter_not_found")
        path = resolve_adapter_path(path)
        if body.lora_path and not self._may_load(path):
            raise APIError(403, "lora_path: loading arbitrary paths at run time is off; start the server with "
                                "--enable-runtime-lora", "lora_path", "runtime_lora_disabled")
        if not Path(path).exists():
            raise APIError(404, f"lora_path: {path!r} does not exist", "lora_path", "adapter_not_found")
        if await self.catalog.entry.remote(name) is not None and not body.load_inplace:
            raise APIError(400, f"lora_name: The lora adapter '{name}' has already been loaded. Unload it first, or "
                                "pass load_inplace: true to replace its weights", "lora_name", "adapter_already_loaded")
        problem = await self.replicas.check.remote(name, path)
        if problem is not None:
            raise APIError(400, problem, "lora_path")
        entry = await self.catalog.add.remote(name, path, body.description, body.examples)
        message = f"Success: LoRA adapter '{name}' added successfully."
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"message": message, "status": "loaded",
                                 "adapter": {"name": name, "path": path, "generation": entry.gen}})
        return PlainTextResponse(message)

    def _may_load(self, path: str) -> bool:
        if self.args.enable_runtime_lora:
            return True
        resolved = Path(path).resolve()
        vetted = {Path(resolve_adapter_path(parse_lora_module(s)["path"])).resolve() for s in self.args.lora_modules}
        demo = {p.resolve() for p in demo_adapters().values()}
        return resolved in vetted | demo or (self.adapter_dir is not None and resolved.is_relative_to(self.adapter_dir))

    @api.post("/v1/unload_lora_adapter")
    @api.post("/unload_lora_adapter")
    async def unload_adapter(self, request: Request):
        """Cluster-wide unload: new requests get 404 at once; answered when every live replica has dropped it
        (in-flight requests finish on it first)."""
        self._guard(request)
        body = parse_body(UnloadLoRARequest, await read_json(request))
        version = await self.catalog.remove.remote(body.lora_name)
        if version is None:
            raise not_found(body.lora_name, "lora_name")
        lagging = await self.catalog.wait_applied.remote(version, UNLOAD_WAIT_S)
        if lagging:
            raise APIError(409, f"lora_name: {body.lora_name!r} is no longer served, but replicas {', '.join(lagging)} "
                                f"still finish requests on it", "lora_name", "adapter_in_use")
        message = f"Success: LoRA adapter '{body.lora_name}' removed successfully."
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"message": message, "status": "unloaded", "lora_name": body.lora_name})
        return PlainTextResponse(message)

    @api.post("/v1/pin_lora_adapter")
    async def pin_adapter(self, request: Request):
        self._guard(request)
        raise APIError(400, "lora_name: pinning is per engine; not available with --num-replicas", "lora_name")

    @api.get("/metrics")
    async def metrics(self, request: Request):
        """Every live replica's /metrics, each series labelled with its replica."""
        self._guard(request)
        reports = await self.catalog.replicas.remote()
        return Response(merge_metrics({r: rep.metrics for r, rep in reports.items()}),
                        media_type=CONTENT_TYPE_LATEST)
