"""The engine on a thread of its own, driven from asyncio.

The step loop runs on one background thread, which alone touches the :class:`LLMEngine`. The event loop hands it
work through :meth:`AsyncEngine.call` (run between two steps) and receives each request's outputs on an
``asyncio.Queue``; so the event loop never blocks on model work, and new requests join the running batch at the
next step (continuous batching across HTTP requests).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from loraplex.engine import LLMEngine
from loraplex.lora.request import LoRARequest
from loraplex.ops import openmp
from loraplex.outputs import RequestOutput
from loraplex.sampling_params import SamplingParams
from loraplex.server.errors import APIError

log = logging.getLogger("loraplex.server")


def adapter_label(lora_request) -> str | None:
    """Metrics label: the adapter's name, ``a*0.7+b*0.3`` for a mixture, None for the base."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return lora_request and lora_request.lora_name
    return "+".join(f"{r.lora_name}*{w:g}" for r, w in lora_request)


class QueueFullError(RuntimeError):
    """The waiting queue is at its cap: the client should retry later (HTTP 503 + Retry-After)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    adapter: str | None
    arrival: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    num_tokens: int = 0
    cache_counted: bool = False


class AsyncEngine:
    """Owns the step-loop thread. ``generate()`` is an async iterator of cumulative :class:`RequestOutput`."""

    def __init__(self, engine: LLMEngine, max_waiting: int = 1024, metrics=None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics  # server.metrics.ServerMetrics or None
        self._calls: queue.SimpleQueue[tuple[Callable, Future]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self.errored: BaseException | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the step loop. The steps run on the engine's thread from now on, so the OpenMP workers the calling
        thread started (loading the model) are freed: with two pools on a 2-core machine every parallel region of
        a step woke a sleeping worker (``ops/openmp.py``)."""
        self._thread.start()
        openmp.release_thread_pool()

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.errored is None

    # ---- calls into the engine thread -----------------------------------------------------------------------
    def call(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on the engine thread between two steps."""
        fut: Future = Future()
        self._calls.put((lambda: fn(*args), fut))
        return fut

    async def run(self, fn: Callable, *args):
        return await asyncio.wrap_future(self.call(fn, *args))

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          lora_request: LoRARequest | None = None, prompt: str | None = None,
                          request_id: str | None = None) -> "RequestStream":
        """Validate and queue a request (errors raise here, before any response is sent); iterate the returned
        stream for its outputs."""
        request_id = request_id or uuid.uuid4().hex
        if params.structured_outputs is not None:  # compiled here, so the engine thread only finds it cached
            await self.compile_grammar(params.structured_outputs)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), adapter_label(lora_request))

        def add() -> None:
            if self.engine.stats().num_waiting >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            self.engine.add_request(prompt_token_ids, params, request_id, prompt, lora_request)
            self._streams[request_id] = stream

        await self.run(add)
        if self.metrics:
            self.metrics.on_request(stream.adapter, len(prompt_token_ids))
        return RequestStream(self, request_id, stream.queue)

    async def compile_grammar(self, spec) -> None:
        """Compile a structured-output constraint on a worker thread (``ValueError`` when it does not compile)."""
        await asyncio.to_thread(self.engine.compile_grammar, spec)

    def abort(self, request_id: str) -> None:
        """Abort a request (between two steps) and free its KV blocks; its stream gets nothing more."""
        def abort() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

        self.call(abort)

    # ---- what the routes need to know (nothing under server/ reaches further into the engine) ----------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.loaded.spec.vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.engine.loaded.eos_token_ids

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    @property
    def serves_adapters(self) -> bool:
        return self.engine.serves_adapters

    def info(self) -> dict:
        """Engine facts for /info: dtype, device, token budget per step, quantization, deterministic mode, bytes
        held, the CPU thread tuner's measurements (ms per token per thread count, per step-size bucket) and the
        kernel choices measured on this machine (``engine.kernel_choice``)."""
        c = self.engine.config
        return {"dtype": str(c.model.dtype).removeprefix("torch."), "device": c.model.device,
                "max_num_batched_tokens": c.scheduler.max_num_batched_tokens, "quantization": c.model.quantization,
                "deterministic": c.model.deterministic, "memory_bytes": self.engine.memory(),
                "cpu_threads": self.engine.thread_choices(), "kernels": self.engine.kernel_choices()}

    def has_adapter(self, name: str) -> bool:
        return self.engine.adapter(name) is not None

    def adapter_names(self) -> list[str]:
        return self.engine.adapter_names()

    def adapter_path(self, name: str) -> str | None:
        entry = self.engine.adapter(name)
        return None if entry is None else entry.path

    def lora_request(self, name: str) -> LoRARequest | None:
        return self.engine.lora_request(name)

    async def list_adapters(self) -> list[dict]:
        return await self.run(self.engine.list_loras)

    async def load_adapter(self, req: LoRARequest, pinned: bool = False, inplace: bool = False) -> None:
        """Register (and validate) an adapter, optionally pinning it; ``inplace``: new weights under a known name.
        Raises ``ValueError`` / ``FileNotFoundError``."""
        await self.run(self.engine.replace_lora if inplace else self.engine.add_lora, req)
        if pinned:
            await self.run(self.engine.pin_lora, req.lora_name)

    async def check_adapter(self, name: str, path: str) -> int:
        """Validate an adapter directory fully (all tensors read) on a worker thread; its rank, or ``ValueError``."""
        return await asyncio.to_thread(self.engine.check_lora, name, path)

    async def unload_adapter(self, name: str) -> None:
        """``RuntimeError`` while requests use it, ``KeyError`` when unknown."""
        await self.run(self.engine.remove_lora, name)

    async def pin_adapter(self, name: str, pinned: bool) -> None:
        await self.run(self.engine.pin_lora if pinned else self.engine.unpin_lora, name)

    # ---- the thread ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            busy = self.engine.has_unfinished_requests()
            try:
                fn, fut = self._calls.get_nowait() if busy else self._calls.get(timeout=0.05)
            except queue.Empty:
                fn = None
            while fn is not None:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
                try:
                    fn, fut = self._calls.get_nowait()
                except queue.Empty:
                    fn = None
            if self.engine.has_unfinished_requests():
                self._step()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a broken step fails the requests in it, not the server
            log.exception("engine step failed; failing %d in-flight requests", len(self._streams))
            for rid, stream in list(self._streams.items()):
                self.engine.abort_request(rid)
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, RuntimeError(f"engine error: {e}"))
            self._streams.clear()
            return
        now = time.perf_counter()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if self.metrics:
                if stream.last_token is None and out.num_cached_tokens is not None and not stream.cache_counted:
                    self.metrics.on_prefix_cache(stream.adapter, len(out.prompt_token_ids), out.num_cached_tokens)
                    stream.cache_counted = True
                n = sum(len(o.token_ids) for o in out.outputs)
                if n > stream.num_tokens:
                    self.metrics.on_tokens(stream.adapter, n - stream.num_tokens,
                                           now - (stream.last_token or stream.arrival), stream.last_token is None)
                    stream.num_tokens, stream.last_token = n, now
            if out.finished:
                del self._streams[out.request_id]
            item = APIError(500, out.error, "model", "adapter_unreadable") if out.error else out
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


class RequestStream:
    """The outputs of one request, cumulative (several engine steps may be coalesced into one item). Leaving the
    iteration early — the client went away, the task was cancelled — aborts the request and frees its KV blocks.

    ``on_close(status, last output or None)`` is called once when the stream ends: ``finished``, ``aborted``
    (left early, or aborted before it was read) or ``failed`` (the engine reported an error)."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue) -> None:
        self.engine, self.request_id, self._queue = engine, request_id, outputs
        self.finished = False
        self.last: RequestOutput | None = None
        self.on_close: Callable[[str, RequestOutput | None], None] | None = None
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        status = "aborted"
        try:
            while not self.finished:
                item = await self._queue.get()
                while not self._queue.empty():
                    nxt = self._queue.get_nowait()
                    item = item if isinstance(item, BaseException) else nxt
                if isinstance(item, BaseException):
                    self.finished, status = True, "failed"
                    raise item
                self.finished, self.last = item.finished, item
                if item.finished:
                    status = "finished"
                yield item
        finally:
            if not self.finished:
                self.finished = True
                self.engine.abort(self.request_id)
            self._close(status)

    async def final(self) -> RequestOutput:
        out = None
        async for out in self:
            pass
        return out

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)
        self._close("aborted")

    def _close(self, status: str) -> None:
        if self._closed:
            return
        self._closed = True
        if self.on_close is not None:
            try:
                self.on_close(status, self.last)
            except Exception:  # noqa: BLE001 - accounting must not break the response
                log.exception("on_close of request %s failed", self.request_id)
