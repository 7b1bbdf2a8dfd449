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


def with_content(extra: dict, description: str = "Successful Response") -> dict:
    """A 200 whose content is JSON (the route's model) plus ``extra`` media types."""
    return {200: {"description": description, "content": extra}}


def finalize(app, api_key: str | None, open_paths: tuple[str, ...]) -> None:
    """Post-process the generated document: drop 422s, add 401 and the bearer scheme when a key is required."""
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
