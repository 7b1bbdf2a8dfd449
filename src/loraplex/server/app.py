"""The FastAPI application: routers, health and metrics, API-key and body-size guards, engine lifespan."""
from __future__ import annotations

import hmac
import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplex.server import admin, openai_api, tgi_api
from loraplex.server.args import MAX_BODY_BYTES
from loraplex.server.errors import error_body, install_error_handlers
from loraplex.server.openapi import PROMETHEUS, errors, finalize, with_content
from loraplex.server.protocol import SGLangGenerateRequest, TGIGenerateRequest
from loraplex.server.state import ServerState

OPEN_PATHS = ("/health", "/metrics")  # everything else needs the API key when one is set


async def _reject(send, status: int, message: str, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": json.dumps(error_body(status, message)).encode()})


class GuardMiddleware:
    """Pure ASGI (streams and disconnects pass through untouched): API key checked in constant time, request
    bodies over ``max_body_bytes`` refused with 413 — by Content-Length, or while reading a chunked body."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            token = given[7:] if given.lower().startswith("bearer ") else headers.get(b"x-api-key", b"").decode()
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await _reject(send, 401, "invalid or missing API key (Authorization: Bearer <key>)",
                                     [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _reject(send, 413, f"request body over {self.max_body_bytes} bytes")
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, size, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                more = msg.get("more_body", False)
                if size > self.max_body_bytes:
                    return await _reject(send, 413, f"request body over {self.max_body_bytes} bytes")
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def receive_again():
                return replay.pop() if replay else await receive()

            return await self.app(scope, receive_again, send)
        return await self.app(scope, receive, send)


def build_app(state: ServerState, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.engine.start()
        yield
        state.engine.shutdown()  # uvicorn has drained in-flight requests by now

    app = FastAPI(title="loraplex", lifespan=lifespan)
    app.state.loraplex = state
    install_error_handlers(app)
    for module in (openai_api, tgi_api, admin):
        app.include_router(module.router)

    @app.get("/health", responses=errors(503))
    async def health():
        if not state.engine.is_running:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses=with_content(PROMETHEUS, "Prometheus text format"))
    async def metrics(_: Request):
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(GuardMiddleware, api_key=state.api_key, max_body_bytes=max_body_bytes)
    app.state.extra_schemas = (SGLangGenerateRequest, TGIGenerateRequest)
    finalize(app, state.api_key, OPEN_PATHS)
    return app
