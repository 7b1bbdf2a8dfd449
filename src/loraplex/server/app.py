"""The FastAPI application: routers, health and metrics, API-key and body-size guards, engine lifespan."""
from __future__ import annotations

import json
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from loraplex.server import admin, openai_api, platform_api, tgi_api, upload_api
from loraplex.platform import Platform
from loraplex.server.args import MAX_BODY_BYTES
from loraplex.server.auth import OPEN_PATHS, Denied, principal_for
from loraplex.server.errors import error_body, install_error_handlers
from loraplex.server.openapi import PROMETHEUS, errors, finalize, with_content
from loraplex.server.protocol import SGLangGenerateRequest, TGIGenerateRequest
from loraplex.server.state import ServerState

UI_DIR = Path(__file__).parent / "ui"  # the web console: static files, no build step
UPLOAD_PATHS = ("/v1/adapters",)  # their bodies may reach --max-upload-bytes


async def _reject(send, status: int, message: str, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": json.dumps(error_body(status, message)).encode()})


class GuardMiddleware:
    """Pure ASGI (streams and disconnects pass through untouched): the caller's key (``server.auth``) becomes
    ``request.state.principal``; request bodies over ``max_body_bytes`` (uploads: ``max_upload_bytes``) are refused
    with 413 — by Content-Length, or while reading a chunked body."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, platform: Platform | None = None) -> None:
        self.app, self.api_key, self.max_body_bytes, self.platform = app, api_key, max_body_bytes, platform

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        try:
            scope.setdefault("state", {})["principal"] = principal_for(self.api_key, self.platform, headers,
                                                                        scope["method"], scope["path"])
        except Denied as e:
            extra = [(b"www-authenticate", b"Bearer")] if e.status == 401 else []
            return await _reject(send, e.status, e.message, extra)
        cap = self.max_body_bytes
        if self.platform is not None and scope["path"] in UPLOAD_PATHS:
            cap = self.platform.max_upload_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            return await _reject(send, 413, f"request body over {cap} bytes")
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, size, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                more = msg.get("more_body", False)
                if size > cap:
                    return await _reject(send, 413, f"request body over {cap} bytes")
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
        if state.platform is not None:
            state.platform.close()  # the ledger's last rows written

    app = FastAPI(title="loraplex", lifespan=lifespan)
    app.state.loraplex = state
    install_error_handlers(app)
    modules = (openai_api, tgi_api, admin) + ((platform_api, upload_api) if state.platform is not None else ())
    for module in modules:
        app.include_router(module.router)

    @app.get("/health", responses=errors(503))
    async def health():
        if not state.engine.is_running:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses=with_content(PROMETHEUS, "Prometheus text format"))
    async def metrics(_: Request):
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=RedirectResponse, status_code=307, openapi_extra={"security": []},
             responses={200: {"description": "the web console (after the redirect)", "content": {"text/html": {}}}})
    async def console():
        """Open the web console: a redirect to /ui/."""
        return RedirectResponse("/ui/")

    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    app.add_middleware(GuardMiddleware, api_key=state.api_key, max_body_bytes=max_body_bytes, platform=state.platform)
    app.state.extra_schemas = (SGLangGenerateRequest, TGIGenerateRequest)
    finalize(app, state.api_key, tuple(p for p in OPEN_PATHS if state.platform is None or p != "/metrics"))
    return app
