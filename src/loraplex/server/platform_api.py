"""The platform's routes (``--platform``): tenants and keys (admin key), deployments and their endpoints, usage.

A deployment is called the way seed 001's platform is: ``POST /deployments/<id>/v1/chat/completions`` (or the
seed's own ``/maas/deployment/<id>/chat/completions``) with the tenant's key; the body's ``model`` may be left out.
Another tenant's deployment, adapter or key is a 404, as an unknown one is.
"""
from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from loraplex.platform import SCOPES, Platform, Principal
from loraplex.platform.ledger import GROUPS, to_csv
from loraplex.platform.store import Deployment
from loraplex.server import openai_api
from loraplex.server.errors import APIError, bad_request, parse_body, read_json
from loraplex.server.openapi import GENERATION, SSE, errors, exactly_one, with_content
from loraplex.server.protocol import AdapterWeight, ChatCompletionRequest, CompletionRequest
from loraplex.server.state import ServerState, caller_of, state_of

router = APIRouter()


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    scopes: list[str] | None = Field(None, description=f"any of {', '.join(SCOPES)} (default: all)",
                                     json_schema_extra={"items": {"enum": list(SCOPES)}, "minItems": 1})
    name: str | None = Field(None, max_length=128)


class DeploymentCreate(BaseModel):
    """One of ``adapter`` (an adapter, the base id, or ``"auto"``) and ``adapters`` (a weighted mixture)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=exactly_one(
        {"adapter": {"type": "string"}, "adapters": {"type": "array"}}))
    name: str = Field(min_length=1, max_length=128)
    adapter: str | None = Field(None, min_length=1)
    adapters: list[AdapterWeight] | None = Field(None, min_length=1)


def platform_of(request: Request) -> tuple[ServerState, Platform, Principal]:
    st = state_of(request)
    return st, st.platform, caller_of(request).principal


# ---- tenants and keys (admin) ---------------------------------------------------------------------------------
@router.post("/v1/tenants", status_code=201, responses=errors(400, 409, 413))
async def create_tenant(body: TenantCreate, request: Request):
    _, platform, _ = platform_of(request)
    return await asyncio.to_thread(platform.create_tenant, body.id)


@router.get("/v1/tenants")
async def list_tenants(request: Request):
    _, platform, _ = platform_of(request)
    return {"object": "list", "data": [platform.tenant(t) for t in sorted(platform.tenants)]}


@router.post("/v1/tenants/{tenant}/keys", status_code=201, responses=errors(400, 404, 413))
async def create_key(tenant: str, body: KeyCreate, request: Request):
    """The key's secret is in this answer only; the server keeps its SHA-256."""
    _, platform, _ = platform_of(request)
    key, secret = await asyncio.to_thread(platform.create_key, tenant, body.scopes, body.name)
    return {**key.public(), "key": secret}


@router.get("/v1/tenants/{tenant}/keys", responses=errors(404))
async def list_keys(tenant: str, request: Request):
    _, platform, _ = platform_of(request)
    return {"object": "list", "data": await asyncio.to_thread(platform.list_keys, tenant)}


@router.delete("/v1/tenants/{tenant}/keys/{key_id}", responses=errors(404))
async def revoke_key(tenant: str, key_id: str, request: Request):
    _, platform, _ = platform_of(request)
    return await asyncio.to_thread(platform.revoke_key, tenant, key_id)


# ---- deployments ------------------------------------------------------------------------------------------------
def _deployment(platform: Platform, who: Principal, dep_id: str) -> Deployment:
    dep = platform.deployments.get(dep_id)
    if dep is None or not who.owns(dep.tenant_id):
        raise APIError(404, f"deployment {dep_id!r} does not exist", "deployment_id", "deployment_not_found")
    return dep


def _check_target(st: ServerState, who: Principal, name: str, param: str) -> None:
    if name in st.resolver.base_names or name == st.auto_name:
        return
    known = st.engine.has_adapter(name) or name in st.resolver.discoverable()
    if not known or not st.visible(who, name):
        raise APIError(404, f"{param}: the model `{name}` does not exist", param, "model_not_found")


@router.post("/v1/deployments", status_code=201, responses=errors(400, 404, 413))
async def create_deployment(body: DeploymentCreate, request: Request):
    st, platform, who = platform_of(request)
    if (body.adapter is None) == (body.adapters is None):
        raise bad_request("adapter: give adapter (a name, the base id or \"auto\") or adapters (a mixture)", "adapter")
    if body.adapter is not None:
        _check_target(st, who, body.adapter, "adapter")
        spec = {"adapter": body.adapter}
    else:
        for k, a in enumerate(body.adapters):
            _check_target(st, who, a.name, f"adapters[{k}].name")
        spec = {"adapters": [a.model_dump() for a in body.adapters]}
    dep = await asyncio.to_thread(platform.create_deployment, who.tenant, body.name, spec)
    return dep.public()


@router.get("/v1/deployments")
async def list_deployments(request: Request):
    _, platform, who = platform_of(request)
    return {"object": "list", "data": [d.public() for d in platform.deployments.values() if who.owns(d.tenant_id)]}


@router.get("/v1/deployments/{dep_id}", responses=errors(404))
async def get_deployment(dep_id: str, request: Request):
    _, platform, who = platform_of(request)
    return _deployment(platform, who, dep_id).public()


@router.post("/v1/deployments/{dep_id}/pause", responses=errors(404))
async def pause_deployment(dep_id: str, request: Request):
    _, platform, who = platform_of(request)
    dep = _deployment(platform, who, dep_id)
    await asyncio.to_thread(platform.set_paused, dep, True)
    return dep.public()


@router.post("/v1/deployments/{dep_id}/resume", responses=errors(404))
async def resume_deployment(dep_id: str, request: Request):
    _, platform, who = platform_of(request)
    dep = _deployment(platform, who, dep_id)
    await asyncio.to_thread(platform.set_paused, dep, False)
    return dep.public()


@router.delete("/v1/deployments/{dep_id}", responses=errors(404))
async def delete_deployment(dep_id: str, request: Request):
    _, platform, who = platform_of(request)
    dep = _deployment(platform, who, dep_id)
    await asyncio.to_thread(platform.delete_deployment, dep)
    return {"id": dep.id, "object": "deployment", "deleted": True}


async def _deployed_body(request: Request, dep_id: str, schema):
    """The request body with the deployment's model (or mixture) filled in; ``request.state.deployment`` set."""
    st, platform, who = platform_of(request)
    dep = _deployment(platform, who, dep_id)
    if dep.paused:
        raise APIError(409, f"deployment {dep.id!r} is paused", "deployment_id", "deployment_paused")
    raw = await read_json(request)
    if not isinstance(raw, dict):
        raise bad_request("the body must be a JSON object")
    serves = dep.spec.get("adapter", st.resolver.base_id)
    if raw.get("model") not in (None, "", dep.id, dep.name, serves):
        raise bad_request(f"model: deployment {dep.id} serves {serves!r}; leave model out", "model")
    for field in ("adapters", "lora_path", "adapter_id"):
        if raw.get(field) is not None:
            raise bad_request(f"{field}: the deployment chooses the adapter", field)
    raw = {**raw, "model": serves, **({"adapters": dep.spec["adapters"]} if "adapters" in dep.spec else {})}
    request.state.deployment = dep.id
    return parse_body(schema, raw)


_CHAT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/ChatCompletionRequest"}}}}}
_COMPLETION_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/CompletionRequest"}}}}}
_DEPLOYED = {**with_content(SSE), **GENERATION, **errors(409)}


@router.post("/deployments/{dep_id}/v1/chat/completions", responses=_DEPLOYED, openapi_extra=_CHAT_BODY)
@router.post("/maas/deployment/{dep_id}/chat/completions", responses=_DEPLOYED, openapi_extra=_CHAT_BODY)
async def deployment_chat(dep_id: str, request: Request):
    body = await _deployed_body(request, dep_id, ChatCompletionRequest)
    return await openai_api.chat_completions(body, request)


@router.post("/deployments/{dep_id}/v1/completions", responses=_DEPLOYED, openapi_extra=_COMPLETION_BODY)
@router.post("/maas/deployment/{dep_id}/completions", responses=_DEPLOYED, openapi_extra=_COMPLETION_BODY)
async def deployment_completions(dep_id: str, request: Request):
    body = await _deployed_body(request, dep_id, CompletionRequest)
    return await openai_api.completions(body, request)


# ---- usage ------------------------------------------------------------------------------------------------------
# what _time reads: Unix seconds, or an ISO date / date-time (a day past its month's end is still a 400)
TIME = (r"^$|^[0-9]+(\.[0-9]*)?$|^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
        r"([T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?)?$")
GROUP_BY = rf"^({'|'.join(GROUPS)})?(,({'|'.join(GROUPS)})?)*$"
_WHEN = {"description": "Unix seconds or an ISO date / date-time (UTC by default)",
         "json_schema_extra": {"pattern": TIME}}
FROM, TO = Query(None, alias="from", **_WHEN), Query(None, **_WHEN)
FORMAT = {"pattern": "^(json|csv)$"}


def _time(value: str | None, param: str) -> float | None:
    """Unix seconds, or an ISO date / date-time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    if not re.fullmatch(TIME, value):
        raise bad_request(f"{param}: {value!r} is neither Unix seconds nor an ISO date", param)
    if re.fullmatch(r"[0-9.]+", value):
        return float(value)
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:  # e.g. the 30th of February
        raise bad_request(f"{param}: {value!r} is not a date", param) from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def _format(value: str) -> None:
    if not re.fullmatch(FORMAT["pattern"], value):
        raise bad_request("format: json or csv", "format")


def _scope(request: Request, tenant: str | None) -> tuple[Platform, str | None]:
    _, platform, who = platform_of(request)
    if who.is_admin:
        return platform, tenant
    if tenant not in (None, who.tenant):
        raise APIError(404, f"tenant {tenant!r} does not exist", "tenant", "tenant_not_found")
    return platform, who.tenant


@router.get("/v1/usage", responses={**with_content({"text/csv": {"schema": {"type": "string"}}}), **errors(400, 404)})
async def get_usage(request: Request, group_by: str = Query("adapter", json_schema_extra={"pattern": GROUP_BY}),
                    tenant: str | None = None, format: str = Query("json", json_schema_extra=FORMAT),
                    since: str | None = FROM, to: str | None = TO):
    """Requests and tokens per ``group_by`` (comma-separated: tenant, adapter, deployment, day, status) over the
    requests started in ``[from, to)``; tenant keys see their own. ``format=csv`` for a spreadsheet."""
    frm, to = _time(since, "from"), _time(to, "to")
    if not re.fullmatch(GROUP_BY, group_by):
        raise bad_request(f"group_by: each must be one of {', '.join(GROUPS)}", "group_by")
    groups = list(dict.fromkeys(g for g in group_by.split(",") if g))  # "day,day" is "day" (was a 500)
    _format(format)
    platform, tenant = _scope(request, tenant)
    await asyncio.to_thread(platform.ledger.flush)
    data = await asyncio.to_thread(platform.ledger.totals, groups, frm, to, tenant)
    if format == "csv":
        return PlainTextResponse(to_csv(data), media_type="text/csv")
    return {"object": "list", "group_by": groups, "from": frm, "to": to, "data": data, "as_of": time.time()}


@router.get("/v1/usage/requests", responses={**with_content({"text/csv": {"schema": {"type": "string"}}}),
                                             **errors(400, 404)})
async def get_usage_rows(request: Request, tenant: str | None = None,
                         format: str = Query("csv", json_schema_extra=FORMAT),
                         since: str | None = FROM, to: str | None = TO):
    """The ledger's rows (one per request) in ``[from, to)``: CSV by default, ``format=json``."""
    frm, to = _time(since, "from"), _time(to, "to")
    _format(format)
    platform, tenant = _scope(request, tenant)
    await asyncio.to_thread(platform.ledger.flush)
    rows = await asyncio.to_thread(platform.ledger.rows, frm, to, tenant)
    if format == "csv":
        return PlainTextResponse(to_csv(rows), media_type="text/csv")
    return {"object": "list", "data": rows}
