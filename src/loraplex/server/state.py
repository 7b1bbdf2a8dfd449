"""What every route shares: the engine, the adapter resolver, the tokenizer, and the submit / wait / stream helpers
that turn engine errors into HTTP errors and client disconnects into aborts."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import quote
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from fastapi.responses import StreamingResponse

from loraplex.lora.demo import DEMO_DIR, resolve_adapter_path
from loraplex.lora.request import LoRARequest
from loraplex.outputs import RequestOutput
from loraplex.platform import Platform, UsageRow
from loraplex.platform.keys import ADMIN, Principal
from loraplex.routing import AdapterCard, CardBook, RouteDecision, Router
from loraplex.sampling_params import SamplingParams, StructuredOutputsParams
from loraplex.server.adapters import AdapterResolver
from loraplex.server.async_engine import (
    AsyncEngine,
    QueueFullError,
    RequestStream,
    adapter_label,
)
from loraplex.server.errors import APIError, bad_request, error_body, from_value_error
from loraplex.server.metrics import ServerMetrics

DISCONNECT_POLL_S = 0.2
log = logging.getLogger("loraplex.server")


@dataclass(frozen=True)
class Caller:
    """Who sent a request (the key's principal) and through which deployment, if any."""

    principal: Principal = ADMIN
    deployment: str | None = None


def caller_of(request: Request) -> Caller:
    """Set by the API-key guard (``principal``) and the deployment routes (``deployment``)."""
    return Caller(getattr(request.state, "principal", ADMIN), getattr(request.state, "deployment", None))


@dataclass
class Submitted:
    served_name: str  # the adapter that serves it, or the base id: the response's ``model``
    lora_request: LoRARequest | None
    stream: RequestStream
    decision: RouteDecision | None = None  # how ``model: "auto"`` chose it
    explain: bool = False  # --router-explain: the candidates and the reason in the headers too

    @property
    def headers(self) -> dict[str, str]:
        """Response headers naming the adapter that serves the request (and the router's score; with
        ``explain``, its top candidates ``name=score,…`` and its reason, percent-encoded beyond ASCII)."""
        h = {"x-loraplex-adapter": self.served_name, "x-request-id": self.stream.request_id}
        if self.decision is not None:
            h["x-loraplex-route-score"] = f"{self.decision.score:.4f}"
            if self.explain:
                h["x-loraplex-route-candidates"] = ",".join(f"{quote(n, safe='')}={s:.4f}"
                                                            for n, s in self.decision.candidates[:5])
                h["x-loraplex-route-reason"] = quote(self.decision.reason, safe=" ()<>=,.:;'!_-")
        return h


@dataclass
class ServerState:
    engine: AsyncEngine
    resolver: AdapterResolver
    metrics: ServerMetrics
    model_path: str
    api_key: str | None = None
    enable_runtime_lora: bool = False
    auto_name: str = "auto"
    startup_paths: set[str] = field(default_factory=set)  # adapter paths the operator gave at start-up
    cards: CardBook = field(default_factory=CardBook)  # given at load time, else the adapter folder's
    router: Router | None = None  # model == auto_name: picks the adapter (or the base) from the request's text
    router_explain: bool = False  # --router-explain
    started: float = field(default_factory=time.time)
    tool_call_parser: str | None = None  # --tool-call-parser; None: chosen from the chat template
    platform: Platform | None = None  # --platform: tenants, uploads, deployments, the token ledger

    def visible(self, who: Caller | Principal, name: str) -> bool:
        """May ``who`` see (list, call, route to) adapter ``name``? Its own and the operator's; never another
        tenant's (asking for one is a 404, as for an unknown name)."""
        principal = who.principal if isinstance(who, Caller) else who
        return self.platform is None or principal.owns(self.platform.owner(name))

    def set_card(self, name: str, description: str | None, examples: list[str] | None) -> None:
        """The card given at load time (validated by the request schema); none given: the folder's."""
        card = AdapterCard.of(description, examples)
        if card is None:
            self.cards.forget(name)
        else:
            self.cards.give(name, card)

    def card(self, name: str, path: str) -> dict | None:
        card = self.adapter_card(name, path)
        return None if card is None else card.to_dict()

    def adapter_card(self, name: str, path: str) -> AdapterCard | None:
        return self.cards.card(name, path)

    # ---- routing (model == auto_name) ---------------------------------------------------------------------------
    async def update_router(self, name: str, path: str | None) -> None:
        """Keep the router in step with an adapter that was loaded from ``path`` (or unloaded: ``None``)."""
        if self.router is None:
            return
        if path is None:
            self.router.remove(name)
            return
        card = self.adapter_card(name, path)

        def set_and_calibrate() -> None:
            self.router.set_card(name, card)
            self.router.calibration()

        await asyncio.to_thread(set_and_calibrate)  # embedding the card's texts, fitting thresholds: off the loop

    def is_auto(self, model: str, lora_path: str | None, adapter_id: str | None) -> bool:
        """``model: "auto"``, or the base with ``lora_path`` / ``adapter_id`` / ``base:`` naming ``"auto"``."""
        auto, bases = self.auto_name, self.resolver.base_names
        if model == auto:
            extra, param = (lora_path, "lora_path") if lora_path else (adapter_id, "adapter_id")
            if extra not in (None, auto):
                raise bad_request(f"{param}: model {auto!r} chooses the adapter itself", param)
            return True
        if model in bases or not model:
            return auto in (lora_path, adapter_id)
        return any(model == f"{b}:{auto}" for b in bases)

    async def route(self, model: str, lora_path: str | None, adapter_id: str | None,
                    query: Callable[[], tuple[str, str | None]], who: Caller
                    ) -> tuple[str, str | None, str | None, RouteDecision | None]:
        """For ``auto`` requests: the router's choice as ``(model, None, None, decision)``, where ``model`` is the
        adapter or the base id, among the adapters ``who`` may see; other requests pass through unchanged.
        ``query()`` gives (prompt, system)."""
        if not self.is_auto(model, lora_path, adapter_id):
            return model, lora_path, adapter_id, None
        if self.router is None:
            decision = RouteDecision(None, 0.0, [], "no router")
        else:
            prompt, system = query()
            allowed = None if self.platform is None else (lambda n: self.visible(who, n))
            if self.router.blocking:  # an embedding forward pass: the event loop keeps serving meanwhile
                decision = await asyncio.to_thread(self.router.route, prompt, system, allowed)
            else:
                decision = self.router.route(prompt, system, allowed)
        name = decision.adapter
        if name is not None and (name in self.resolver.draining or
                                 (not self.engine.has_adapter(name) and name not in self.resolver.discoverable())):
            decision = RouteDecision(None, decision.score, decision.candidates,
                                     f"{name} is no longer served ({decision.reason})")
        log.info("route %s -> %s", self.auto_name, decision.summary())
        return decision.adapter or self.resolver.base_id, None, None, decision

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Token-id prompts: every id in the vocabulary (a 400 naming ``param``, before anything decodes them)."""
        vocab = self.engine.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"{param}: every token id must be in [0, {vocab})", param)

    async def compile_grammar(self, spec: StructuredOutputsParams, param: str) -> None:
        """Compile a constraint off the event loop and the engine thread (cached by the engine, so the request's
        own add finds it); one that does not compile is a 400 naming ``param``."""
        try:
            await self.engine.compile_grammar(spec)
        except ValueError as e:
            raise bad_request(f"{param}: {str(e).split(': ', 1)[-1]}", param) from None

    def encode_chat(self, conversation: list[dict], add_generation_prompt: bool, kwargs: dict | None,
                    tools: list[dict] | None = None) -> list[int]:
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise bad_request("messages: this model has no chat template; use /v1/completions", "messages")
        try:
            text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **({"tools": tools} if tools else {}), **(kwargs or {}))
        except Exception as e:  # noqa: BLE001 - template errors are the caller's messages
            raise bad_request(f"messages: the chat template failed: {e}", "messages") from None
        return tok.encode(text, add_special_tokens=False)

    def may_load(self, path: str) -> bool:
        """May the runtime load route (or LoRAX's ``adapter_source: "local"``) read adapter ``path``? Always with
        --enable-runtime-lora; else only what the operator vetted: demo adapters, folders under --adapter-dir and
        paths given at start-up."""
        if self.enable_runtime_lora:
            return True
        resolved = Path(resolve_adapter_path(path)).resolve()
        if str(resolved) in self.startup_paths or resolved.parent == DEMO_DIR.resolve():
            return True
        d = self.resolver.adapter_dir
        return d is not None and resolved.is_relative_to(d)

    async def load_local(self, path: str, param: str, who: Caller) -> None:
        """Register the adapter in directory ``path`` under that path as its name (LoRAX's local adapters)."""
        if not who.principal.is_admin:
            raise APIError(403, f"{param}: tenant keys cannot load server paths; upload the adapter to "
                                "/v1/adapters", param, "forbidden")
        if not self.may_load(path):
            raise APIError(403, f"{param}: loading arbitrary paths at run time is off; start the server with "
                                "--enable-runtime-lora", param, "runtime_lora_disabled")
        if not (Path(path) / "adapter_config.json").is_file():
            raise APIError(404, f"{param}: no adapter directory at {path!r}", param, "adapter_not_found")
        try:
            await self.engine.load_adapter(LoRARequest(path, lora_path=path))
        except (ValueError, FileNotFoundError) as e:
            raise from_value_error(e) from None
        await self.update_router(path, path)

    async def adapters(self, who: Caller) -> list[dict]:
        """Known adapters (engine rows) plus folders under --adapter-dir that are not registered yet; those ``who``
        may see."""
        if not self.engine.serves_adapters:
            return []
        rows = [r for r in await self.engine.list_adapters() if self.visible(who, r["name"])]
        rows += [{"name": n, "path": str(self.resolver.adapter_dir / n), "lora_int_id": None, "rank": None,
                  "targets": None, "tier": "disk", "pinned": False, "in_flight": 0}
                 for n in self.resolver.discoverable()]
        for row in rows:
            row["card"] = self.card(row["name"], row["path"])
        return rows

    async def submit(self, model: str, lora_path: str | None, adapter_id: str | None, prompt_ids: list[int],
                     params: SamplingParams, prompt: str | None, decision: RouteDecision | None = None,
                     adapters: list | None = None, *, who: Caller) -> Submitted:
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_dead")
        visible = lambda name: self.visible(who, name)  # noqa: E731
        served, lora = await self.resolver.resolve(model, lora_path, adapter_id, visible)
        if adapters:
            if lora is not None or decision is not None:
                raise bad_request("adapters: a mixture is asked with model = the base id and no other adapter",
                                  "adapters")
            lora = [(await self.resolver.lora_request(a.name, "adapters", visible), a.weight) for a in adapters]
            served = adapter_label(lora)
        try:
            stream = await self.engine.add_request(prompt_ids, params, lora, prompt)
        except QueueFullError as e:
            raise APIError(503, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        except (ValueError, TypeError, KeyError) as e:
            raise from_value_error(e) from None
        if decision is not None:
            self.metrics.routes.labels(served).inc()
        if self.platform is not None:
            stream.on_close = self._ledger_entry(who, served, stream.request_id, len(prompt_ids))
        return Submitted(served, lora, stream, decision, self.router_explain)

    def _ledger_entry(self, who: Caller, served: str, request_id: str, prompt_tokens: int):
        """The stream's ``on_close``: one ledger row with the tokens its response reports as ``usage``."""
        ledger, started, p = self.platform.ledger, time.time(), who.principal

        def on_close(status: str, out: RequestOutput | None) -> None:
            done = sum(len(o.token_ids) for o in out.outputs) if out is not None else 0
            ledger.append(UsageRow(request_id, p.tenant, p.key_id, who.deployment, served, prompt_tokens,
                                   (out.num_cached_tokens or 0) if out is not None else 0, done, started,
                                   time.time(), status))
        return on_close

    async def wait(self, request: Request, sub: Submitted) -> RequestOutput:
        """The final output; if the client disconnects first, the request is aborted."""
        task = asyncio.ensure_future(sub.stream.final())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not done and await request.is_disconnected():
                    task.cancel()
                    raise APIError(499, "client disconnected")
            out = task.result()
        finally:
            if not task.done():
                task.cancel()
            sub.stream.abort()
        return out

    def streaming(self, sub: Submitted, chunks: AsyncIterator[str]) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream, OpenAI-style
                yield f"data: {json.dumps(error_body(500, str(e)))}\n\n"
            finally:  # a disconnect cancels this generator: abort the request and free its blocks
                sub.stream.abort()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **sub.headers})


def state_of(request: Request) -> ServerState:
    return request.app.state.loraplex
