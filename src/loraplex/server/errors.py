"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

``type`` is the name vLLM gives the error (the openai SDK's exception class for the status: ``NotFoundError``,
``BadRequestError``, …); ``code`` is always a string (``model_not_found``, or one derived from the status).
"""
from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.platform.store import PlatformError

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          409: "ConflictError", 413: "RequestTooLargeError", 422: "UnprocessableEntityError", 429: "RateLimitError",
          499: "ClientDisconnectedError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
_CODES = {400: "bad_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "request_too_large", 422: "unprocessable_entity", 429: "rate_limited",
          499: "client_disconnected", 500: "internal_error", 503: "unavailable"}
_HTTP_METHODS = {"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"}
_PARAM = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def _allowed(request: Request) -> list[str]:
    """The methods the OpenAPI document lists for the path templates this request's path matches (a parameter is
    one segment; where none matches so, it may span several, as ``{name:path}`` does)."""
    paths = request.app.openapi().get("paths", {})
    for param in ("[^/]+", ".+"):
        methods: set[str] = set()
        for template, ops in paths.items():
            if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", param, re.escape(template)), request.url.path):
                methods |= {m.upper() for m in ops if m.upper() in _HTTP_METHODS}
        if methods:
            return sorted(methods)
    return []


class APIError(Exception):
    """An error answered to the client; ``param`` names the offending request field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def from_value_error(e: Exception, status: int = 400) -> APIError:
    """Our engine raises ``ValueError("param: why")``: keep the message, lift the parameter name out of it."""
    message = str(e).strip("'\"") if isinstance(e, KeyError) else str(e)
    m = _PARAM.match(message)
    return APIError(status, message, m.group(1) if m else None)


async def read_json(request: Request):
    """The request's JSON body (400 when it is not JSON): for routes that choose the body's schema themselves."""
    try:
        return await request.json()
    except ValueError as e:
        raise APIError(400, f"malformed JSON body: {e}") from None


def parse_body(model, raw):
    """Validate ``raw`` as ``model``; errors answer like FastAPI's own body validation (400 naming the field)."""
    from pydantic import ValidationError

    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    default_type = "InternalServerError" if status >= 500 else "BadRequestError"
    return {"error": {"message": message, "type": _TYPES.get(status, default_type), "param": param,
                      "code": code if code is not None else _CODES.get(status, f"http_{status}")}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=err.headers)


def _loc_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(PlatformError)
    async def _platform(_: Request, exc: PlatformError):
        return error_response(APIError(exc.status, exc.message, exc.param, exc.code))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', '')}"))
        param = _loc_param(tuple(first.get("loc", ())))
        return error_response(APIError(400, f"{param}: {first.get('msg', 'invalid value')}" if param
                                       else str(first.get("msg", "invalid request")), param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names one route's methods; a path may have several
            headers["Allow"] = ", ".join(_allowed(request)) or headers.get("Allow", "")
        return error_response(APIError(exc.status_code, str(exc.detail), headers=headers or None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))
