"""The OpenAPI document tells the truth: every status a route answers (errors in OpenAI's shape), the streaming
(SSE), plain-text and Prometheus content types, the bearer scheme when ``--api-key`` is set. Body validation answers
400 (never FastAPI's 422), so 422 is not listed."""
from __future__ import annotations

from pydantic import BaseModel

_DESCRIPTIONS = {400: "Bad request: the error names the parameter", 401: "Missing or wrong API key",
                 403: "Not allowed: runtime adapter loading is off, or the key lacks the scope", 404: "Unknown model, adapter or path",
                 409: "Conflict: the adapter is in use or exists, the deployment is paused", 413: "Request body too large",
                 500: "The request's adapter could not be read", 503: "Queue full (Retry-After) or engine down"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape; ``type`` as vLLM names it)."""

    error: ErrorDetail


def errors(*statuses: int) -> dict:
    """``responses=`` entries for the error statuses a route can answer."""
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}


SSE = {"text/event-stream": {"schema": {}}}  # server-sent events; each ``data:`` line is one JSON chunk
TEXT = {"text/plain": {"schema": {"type": "string"}}}
PROMETHEUS = {"text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}
GENERATION = errors(400, 404, 413, 500, 503)  # what every generation route can answer besides 200


def exactly_one(options: dict[str, dict], unset: dict[str, list] | None = None) -> dict:
    """A model's ``json_schema_extra``: exactly one of the fields in ``options`` (name → its schema when set) is set;
    a field counts as not set when absent, null, or one of its ``unset`` values."""
    unset = unset or {}
    return {"oneOf": [{"required": [name], "properties": {
        name: schema, **{o: {"enum": [None, *unset.get(o, [])]} for o in options if o != name}}}
        for name, schema in options.items()]}


def with_content(extra: dict, description: str = "Successful Response") -> dict:
    """A 200 whose content is JSON (the route's model) plus ``extra`` media types."""
    return {200: {"description": description, "content": extra}}


# OpenAPI links: how one answer feeds the next request (load → use → unload, tenant → key → revoke,
# deployment → call → pause → delete). Generated clients show them; schemathesis' stateful phase walks them. A link
# whose source or target route is not served (the platform's without --platform) is left out.
_NAME = {"lora_name": "$request.body#/lora_name"}
_DEP = {"path.dep_id": "$response.body#/id"}
_FIRST = "$response.body#/data/0/"
LINKS = [  # (source "METHOD path status", link name, target "METHOD path", parameters, request body)
    ("GET /v1/models 200", "model", "GET /v1/models/{model_id}", {"path.model_id": _FIRST + "id"}, None),
    ("GET /v1/lora_adapters 200", "reload", "POST /v1/load_lora_adapter", {},
     {"lora_name": _FIRST + "name", "lora_path": _FIRST + "path", "load_inplace": True}),
    ("GET /v1/lora_adapters 200", "deploy", "POST /v1/deployments", {}, {"adapter": _FIRST + "name"}),
    ("POST /v1/load_lora_adapter 200", "complete", "POST /v1/completions", {}, {"model": _NAME["lora_name"]}),
    ("POST /v1/load_lora_adapter 200", "chat", "POST /v1/chat/completions", {}, {"model": _NAME["lora_name"]}),
    ("POST /v1/load_lora_adapter 200", "pin", "POST /v1/pin_lora_adapter", {}, _NAME),
    ("POST /v1/load_lora_adapter 200", "unload", "POST /v1/unload_lora_adapter", {}, _NAME),
    ("POST /v1/unload_lora_adapter 200", "load", "POST /v1/load_lora_adapter", {}, _NAME),
    ("POST /v1/tenants 201", "key", "POST /v1/tenants/{tenant}/keys", {"path.tenant": "$response.body#/id"}, None),
    ("POST /v1/tenants 201", "keys", "GET /v1/tenants/{tenant}/keys", {"path.tenant": "$response.body#/id"}, None),
    ("POST /v1/tenants/{tenant}/keys 201", "revoke", "DELETE /v1/tenants/{tenant}/keys/{key_id}",
     {"path.tenant": "$request.path.tenant", "path.key_id": "$response.body#/id"}, None),
    ("POST /v1/deployments 201", "get", "GET /v1/deployments/{dep_id}", _DEP, None),
    ("POST /v1/deployments 201", "call", "POST /deployments/{dep_id}/v1/completions", _DEP, None),
    ("POST /v1/deployments 201", "chat", "POST /maas/deployment/{dep_id}/chat/completions", _DEP, None),
    ("POST /v1/deployments 201", "pause", "POST /v1/deployments/{dep_id}/pause", _DEP, None),
    ("POST /v1/deployments 201", "delete", "DELETE /v1/deployments/{dep_id}", _DEP, None),
    ("POST /v1/deployments/{dep_id}/pause 200", "resume", "POST /v1/deployments/{dep_id}/resume",
     {"path.dep_id": "$request.path.dep_id"}, None),
    ("GET /v1/deployments 200", "get", "GET /v1/deployments/{dep_id}", {"path.dep_id": _FIRST + "id"}, None),
    ("POST /v1/adapters 201", "get", "GET /v1/adapters/{name}", {"path.name": "$response.body#/id"}, None),
    ("POST /v1/adapters 201", "delete", "DELETE /v1/adapters/{name}", {"path.name": "$response.body#/id"}, None),
    ("POST /v1/adapters 201", "deploy", "POST /v1/deployments", {}, {"adapter": "$response.body#/id"}),
    ("GET /v1/adapters 200", "get", "GET /v1/adapters/{name}", {"path.name": _FIRST + "id"}, None),
]


def _add_links(paths: dict) -> None:
    for source, name, target, parameters, body in LINKS:
        method, path, status = source.split()
        response = paths.get(path, {}).get(method.lower(), {}).get("responses", {}).get(status)
        method, path = target.split()
        op = paths.get(path, {}).get(method.lower())
        if response is None or op is None:
            continue
        link = {"operationId": op["operationId"], **({"parameters": parameters} if parameters else {}),
                **({"requestBody": body} if body is not None else {})}
        response.setdefault("links", {})[name] = link


def finalize(app, api_key: str | None, open_paths: tuple[str, ...]) -> None:
    """Post-process the generated document: drop 422s, add 401 and the bearer scheme when a key is required, add the
    links."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        for path, ops in doc.get("paths", {}).items():
            for op in ops.values():
                responses = op.get("responses", {})
                responses.pop("422", None)
                if api_key is not None and path not in open_paths and op.get("security") != []:
                    responses.setdefault("401", {"description": _DESCRIPTIONS[401], "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
                    op["security"] = [{"bearer": []}]
        _add_links(doc.get("paths", {}))
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for model in (ErrorResponse, *getattr(app.state, "extra_schemas", ())):
            for name, schema in model.model_json_schema(ref_template="#/components/schemas/{model}").pop(
                    "$defs", {}).items():
                schemas.setdefault(name, schema)
            schemas.setdefault(model.__name__, {k: v for k, v in model.model_json_schema(
                ref_template="#/components/schemas/{model}").items() if k != "$defs"})
        if api_key is not None:
            components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
