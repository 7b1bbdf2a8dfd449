"""Adapter uploads (``--platform``): ``POST /v1/adapters`` takes a tenant's PEFT files — multipart
(``adapter_config.json``, ``adapter_model.safetensors``, optional ``adapter_card.json``, or one archive of them, with
a ``name`` field) or a raw ``.tar.gz`` / ``.zip`` body (``?name=``) — validates them as loading would (and reads
every tensor), stores them content-addressed and serves them as ``<tenant>/<name>`` at once.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from fastapi import APIRouter, Request
from sqlalchemy.exc import IntegrityError
from starlette.formparsers import MultiPartException

from loraplex.lora.request import LoRARequest
from loraplex.platform import Platform, Principal
from loraplex.platform.store import NAME, UploadedAdapter, check_name
from loraplex.platform.uploads import CARD, UploadError, commit, scratch_dir, unpack
from loraplex.routing import AdapterCard
from loraplex.server.errors import APIError, bad_request
from loraplex.server.openapi import errors
from loraplex.server.platform_api import platform_of
from loraplex.server.state import ServerState

router = APIRouter()
RAW_TYPES = {"application/zip": ".zip", "application/x-zip-compressed": ".zip", "application/gzip": ".tar.gz",
             "application/x-gzip": ".tar.gz", "application/x-tar": ".tar"}
_NAME = {"type": "string", "pattern": NAME.pattern}
_UPLOAD_BODY = {"parameters": [  # a raw archive body names the adapter in the query
    {"name": "name", "in": "query", "schema": _NAME, "description": "with a raw archive body"},
    {"name": "tenant", "in": "query", "schema": {"type": "string"},
     "description": "with a raw archive body (admin key)"}],
    "requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["name"], "properties": {
        "name": _NAME, "tenant": {"type": "string", "description": "admin key only"},
        "adapter_config.json": {"type": "string", "format": "binary"},
        "adapter_model.safetensors": {"type": "string", "format": "binary"},
        "adapter_card.json": {"type": "string", "format": "binary"},
        "archive": {"type": "string", "format": "binary", "description": ".tar.gz / .tgz / .tar / .zip"}}}},
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in RAW_TYPES}}}}


def _owner(platform: Platform, who: Principal, tenant: str | None) -> str:
    if not who.is_admin:
        if tenant not in (None, "", who.tenant):
            raise APIError(404, f"tenant: tenant {tenant!r} does not exist", "tenant", "tenant_not_found")
        return who.tenant
    if not tenant:
        raise bad_request("tenant: the admin key uploads for a tenant; give its id", "tenant")
    if tenant not in platform.tenants:
        raise APIError(404, f"tenant: tenant {tenant!r} does not exist", "tenant", "tenant_not_found")
    return tenant


def _full_name(platform: Platform, who: Principal, name: str) -> UploadedAdapter:
    """An uploaded adapter by ``name`` (the caller's own) or ``tenant/name``; 404 when the caller may not see it."""
    full = name if "/" in name else f"{who.tenant}/{name}"
    a = platform.adapters.get(full)
    if a is None or not who.owns(a.tenant_id):
        raise APIError(404, f"The model `{name}` does not exist.", "name", "model_not_found")
    return a


def _check_card(folder: Path) -> None:
    if (folder / CARD).is_file():
        try:
            AdapterCard.from_dict(json.loads((folder / CARD).read_text()))
        except (ValueError, UnicodeDecodeError) as e:
            raise UploadError(f"file: {CARD}: {e}") from None


async def _parts(request: Request):
    """``(fields, [(file name, stream)], closer)`` from a multipart form or a raw archive body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=4, max_fields=8)
        except MultiPartException as e:
            raise bad_request(f"file: malformed multipart body ({e.message})", "file") from None
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        files = [(v.filename or k, v.file) for k, v in form.multi_items() if not isinstance(v, str)]
        return fields, files, form.close
    if ctype in RAW_TYPES:
        spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)
        async for chunk in request.stream():
            spool.write(chunk)
        spool.seek(0)

        async def close():
            spool.close()
        return dict(request.query_params), [(f"upload{RAW_TYPES[ctype]}", spool)], close
    raise bad_request("content-type: send multipart/form-data (the adapter's files, or one archive) or a raw "
                      f"archive ({', '.join(RAW_TYPES)})", "content-type")


async def _store(st: ServerState, platform: Platform, full: str, files) -> tuple[str, Path, int, int]:
    """Unpack, validate and commit: ``(digest, folder, bytes, rank)``. Nothing stays behind on a refusal."""
    root = platform.adapter_root
    tmp = await asyncio.to_thread(scratch_dir, root)
    try:
        await asyncio.to_thread(unpack, files, tmp, platform.max_upload_bytes)
        await asyncio.to_thread(_check_card, tmp)
        try:
            rank = await st.engine.check_adapter(full, str(tmp))
        except (ValueError, OSError) as e:  # the message names the adapter, not the server's scratch path
            raise UploadError(f"file: {str(e).replace(f' ({tmp})', '')}") from None
        size = sum(p.stat().st_size for p in tmp.iterdir())
        digest = (await asyncio.to_thread(commit, tmp, root))[0]
        return digest, root / digest, size, rank
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@router.post("/v1/adapters", status_code=201, responses=errors(400, 404, 409, 413), openapi_extra=_UPLOAD_BODY)
async def upload_adapter(request: Request):
    st, platform, who = platform_of(request)
    start = time.perf_counter()
    fields, files, close = await _parts(request)
    try:
        name = check_name(fields.get("name"), "name") if fields.get("name") else None
        if name is None:
            raise bad_request("name: the adapter's name (served as <tenant>/<name>) is required", "name")
        full = f"{_owner(platform, who, fields.get('tenant'))}/{name}"
        if full in platform.adapters or st.engine.has_adapter(full):
            raise APIError(409, f"name: {full!r} exists; delete it first", "name", "adapter_exists")
        try:
            digest, folder, size, rank = await _store(st, platform, full, files)
        except UploadError as e:
            raise bad_request(str(e), "file") from None
    finally:
        await close()
    tenant, short = full.split("/", 1)
    entry = UploadedAdapter(tenant, short, digest, size, rank, time.time())
    try:
        await asyncio.to_thread(platform.record_adapter, entry)
    except IntegrityError:
        raise APIError(409, f"name: {full!r} exists; delete it first", "name", "adapter_exists") from None
    try:
        await st.engine.load_adapter(LoRARequest(full, lora_path=str(folder)))
    except (ValueError, FileNotFoundError) as e:
        await asyncio.to_thread(platform.forget_adapter, full)
        raise bad_request(f"file: {e}", "file") from None
    await st.update_router(full, str(folder))
    return {**await _describe(st, entry), "seconds": round(time.perf_counter() - start, 4)}


async def _describe(st: ServerState, a: UploadedAdapter, rows: dict | None = None) -> dict:
    if rows is None:
        rows = {r["name"]: r for r in await st.engine.list_adapters()}
    row = rows.get(a.full_name, {})
    return {"id": a.full_name, "object": "adapter", "tenant": a.tenant_id, "name": a.name, "digest": a.digest,
            "bytes": a.size, "rank": a.rank, "created": a.created, "tier": row.get("tier"),
            "in_flight": row.get("in_flight", 0), "card": st.card(a.full_name, row.get("path", ""))}


@router.get("/v1/adapters")
async def list_uploaded(request: Request):
    st, platform, who = platform_of(request)
    rows = {r["name"]: r for r in await st.engine.list_adapters()}
    mine = [a for a in platform.adapters.values() if who.owns(a.tenant_id)]
    return {"object": "list", "data": [await _describe(st, a, rows) for a in sorted(mine, key=lambda a: a.full_name)]}


@router.get("/v1/adapters/{name:path}", responses=errors(404))
async def get_uploaded(name: str, request: Request):
    st, platform, who = platform_of(request)
    return await _describe(st, _full_name(platform, who, name))


@router.delete("/v1/adapters/{name:path}", responses=errors(404, 409))
async def delete_uploaded(name: str, request: Request):
    """Refused (409) while requests use it or a deployment serves it."""
    st, platform, who = platform_of(request)
    a = _full_name(platform, who, name)
    if users := platform.users_of(a.full_name):
        raise APIError(409, f"name: {a.full_name!r} is served by deployment(s) {', '.join(users)}; delete them first",
                       "name", "adapter_in_use")
    try:
        await st.engine.unload_adapter(a.full_name)
    except RuntimeError as e:
        raise APIError(409, f"name: {e}; retry when they are done", "name", "adapter_in_use") from None
    except KeyError:
        pass
    await st.update_router(a.full_name, None)
    await asyncio.to_thread(platform.forget_adapter, a.full_name)
    return {"id": a.full_name, "object": "adapter", "deleted": True}
