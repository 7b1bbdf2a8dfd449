"""Admin routes (vLLM's bodies and answers): load / unload adapters at run time, list them with their tier, pin them.

Load and unload answer vLLM's plain text (``Success: LoRA adapter 'x' added successfully.``); a client that sends
``Accept: application/json`` gets the adapter's row too. Without ``--enable-runtime-lora`` (or vLLM's
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) the load route only takes adapters the operator already vetted: demo
adapter names, folders under ``--adapter-dir`` and paths given at start-up. A load by name alone finds the adapter
through the same resolvers as requests. Loading a known name is a 400 unless ``load_inplace`` (new requests get
the new weights; those in flight finish on the old). Unloading an adapter with requests in flight answers 409, or
with ``"wait": true`` stops routing to it and waits for them; it never breaks them.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from loraplex.lora.demo import demo_adapters, resolve_adapter_path
from loraplex.lora.request import LoRARequest
from loraplex.routing import RECENT_DECISIONS
from loraplex.server.adapters import not_found
from loraplex.server.errors import APIError, from_value_error
from loraplex.server.openapi import TEXT, errors, with_content
from loraplex.server.protocol import LoadLoRARequest, UnloadLoRARequest
from loraplex.server.state import Caller, ServerState, state_of

router = APIRouter()
UNLOAD_WAIT_S = 120.0
LOAD_RESPONSES = {**with_content({**TEXT, "application/json": {}}), **errors(400, 403, 404, 413)}
UNLOAD_RESPONSES = {**with_content({**TEXT, "application/json": {}}), **errors(400, 404, 409, 413)}


def _answer(request: Request, message: str, **detail) -> Response:
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"message": message, **detail})
    return PlainTextResponse(message)


async def _row(st: ServerState, name: str) -> dict:
    return next(r for r in await st.adapters(Caller()) if r["name"] == name)


def _known(request: Request, name: str) -> ServerState:
    """The state, after checking that adapter ``name`` is registered (else 404)."""
    st = state_of(request)
    if not st.engine.has_adapter(name):
        raise not_found(name, "lora_name")
    return st


@router.post("/v1/load_lora_adapter", responses=LOAD_RESPONSES)
@router.post("/load_lora_adapter", responses=LOAD_RESPONSES)  # SGLang's path
async def load_lora_adapter(body: LoadLoRARequest, request: Request):
    st = state_of(request)
    name = body.lora_name
    if name in st.resolver.base_names or name == st.auto_name:
        raise APIError(400, f"lora_name: {name!r} is a reserved model name", "lora_name")
    if not st.engine.serves_adapters:
        raise APIError(400, "lora_name: the server was started without LoRA support", "lora_name")
    if body.base_model_name and body.base_model_name not in st.resolver.base_names:
        raise APIError(400, f"base_model_name: this server serves {', '.join(sorted(st.resolver.base_names))}, not "
                            f"{body.base_model_name!r}", "base_model_name")
    path = body.lora_path or st.resolver.folder(name) or (name if name in demo_adapters() else None)
    if path is None:
        raise APIError(404, f"lora_path: no lora_path given and no adapter named {name!r} found by the resolvers "
                            "(--adapter-dir, demo adapters)", "lora_path", "adapter_not_found")
    if not st.may_load(path):
        raise APIError(403, "lora_path: loading arbitrary paths at run time is off; start the server with "
                            "--enable-runtime-lora", "lora_path", "runtime_lora_disabled")
    if not Path(resolve_adapter_path(path)).exists():
        raise APIError(404, f"lora_path: {path!r} does not exist", "lora_path", "adapter_not_found")
    known = st.engine.has_adapter(name)
    if known and not body.load_inplace:
        raise APIError(400, f"lora_name: The lora adapter '{name}' has already been loaded. Unload it first, or "
                            "pass load_inplace: true to replace its weights", "lora_name", "adapter_already_loaded")
    try:
        await st.engine.load_adapter(LoRARequest(name, lora_path=path), body.pinned, inplace=known)
    except (ValueError, FileNotFoundError) as e:
        raise from_value_error(e) from None
    st.set_card(name, body.description, body.examples)
    row = await _row(st, name)
    await st.update_router(name, row["path"])
    return _answer(request, f"Success: LoRA adapter '{name}' added successfully.", status="loaded", adapter=row)


@router.post("/v1/unload_lora_adapter", responses=UNLOAD_RESPONSES)
@router.post("/unload_lora_adapter", responses=UNLOAD_RESPONSES)  # SGLang's path
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request):
    st = _known(request, body.lora_name)
    deadline = asyncio.get_running_loop().time() + UNLOAD_WAIT_S
    if body.wait:
        st.resolver.draining.add(body.lora_name)
    try:
        while True:
            try:
                await st.engine.unload_adapter(body.lora_name)
                break
            except RuntimeError as e:  # requests in flight
                if not body.wait or asyncio.get_running_loop().time() > deadline:
                    raise APIError(409, f"{e}; retry later or unload with \"wait\": true", "lora_name",
                                   "adapter_in_use") from None
                await asyncio.sleep(0.05)
            except KeyError:
                raise not_found(body.lora_name, "lora_name") from None
    finally:
        st.resolver.draining.discard(body.lora_name)
    st.set_card(body.lora_name, None, None)
    await st.update_router(body.lora_name, None)
    return _answer(request, f"Success: LoRA adapter '{body.lora_name}' removed successfully.", status="unloaded",
                   lora_name=body.lora_name)


@router.get("/v1/lora_adapters")
async def list_lora_adapters(request: Request):
    st = state_of(request)
    return {"object": "list", "data": await st.adapters(Caller())}  # an admin route


ROUTER_SCHEMA = {"type": "object", "required": ["model", "scorer", "cards", "recent"], "properties": {
    "model": {"type": "string"}, "scorer": {"type": ["object", "null"]}, "cards": {"type": "object"},
    "recent": {"type": "array", "items": {"type": "object"}}}}
ROUTER_INFO = {200: {"description": "The router of model \"auto\": its scorer and why it was chosen, the spread, "
                                    "margin and each card's threshold, and its last decisions, newest first",
                     "content": {"application/json": {"schema": ROUTER_SCHEMA}}}}


@router.get("/v1/router", responses={**ROUTER_INFO, **errors(400)})
async def router_info(request: Request, recent: int = Query(20, ge=0, le=RECENT_DECISIONS,
                                                            description="how many of the last decisions")):
    """The router (an admin route: its decisions name every tenant's adapters)."""
    st = state_of(request)
    if st.router is None:
        return {"model": st.auto_name, "scorer": None, "cards": {}, "recent": []}
    info = await asyncio.to_thread(st.router.describe, recent)  # fits thresholds of changed cards first
    return {"model": st.auto_name, **info}


@router.post("/v1/pin_lora_adapter", responses=errors(400, 404, 413))
async def pin_lora_adapter(body: UnloadLoRARequest, request: Request):
    """``{"lora_name", "pinned": true|false}``: keep an adapter in a device slot (or release it)."""
    st = _known(request, body.lora_name)
    pin = (body.model_extra or {}).get("pinned", True)
    try:
        await st.engine.pin_adapter(body.lora_name, pin)
    except ValueError as e:
        raise from_value_error(e) from None
    return {"status": "pinned" if pin else "unpinned", "adapter": await _row(st, body.lora_name)}
