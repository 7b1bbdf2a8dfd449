"""FCFS continuous batching with chunked prefill and recompute preemption.

Every step has a token budget (``max_num_batched_tokens``). Running requests are served first (a decode costs one
token, an unfinished prefill continues with the next chunk), then waiting requests are admitted while sequence
slots, budget and KV blocks last. When blocks run out for a running request, the newest running request is
preempted: its blocks are freed and it returns to the front of the queue to recompute its tokens later.

Adapters: a request is admitted only when its adapters fit the device slots beside those of the running requests
and the pinned ones (``AdapterResidency.can_hold``); admission holds them, leaving running releases them. A request
whose adapter cannot be read fails at admission (``SchedulerOutput.failed``), alone.
"""
from __future__ import annotations

from collections import deque

from loraplex.config import SchedulerConfig
from loraplex.kv_cache import BlockManager
from loraplex.lora.residency import AdapterResidency, AdapterUnreadable, NoAdapters
from loraplex.request import Request, RequestStatus
from loraplex.scheduler.output import (
    FailedRequest,
    ModelRunnerOutput,
    SampledToken,
    ScheduledRequest,
    SchedulerOutput,
    XLoRAPhase,
)


class Scheduler:
    """Decides, step by step, which tokens of which requests the model runs."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 residency: AdapterResidency | None = None) -> None:
        self.config = config
        self.kv = block_manager
        self.residency = residency or NoAdapters()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest admission first; preemption takes from the end
        self.requests: dict[str, Request] = {}
        self._finished_since_last_step: list[str] = []
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request_id: str, status: RequestStatus) -> None:
        """End a request (stop, length or abort): leave the queues, free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if req in self.running:
            self._leave_running(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if not req.status.finished:
            req.status = status
        self.kv.free(*req.kv_ids(request_id))
        self._finished_since_last_step.append(request_id)

    def _leave_running(self, req: Request) -> None:
        self.running.remove(req)
        self.residency.release(set(req.lora_names))

    @staticmethod
    def _xlora_phase(req: Request) -> XLoRAPhase | None:
        """An X-LoRA request alternates: a step of its scaling pass (the classifier scores its next tokens), then a
        step of its real pass over those tokens. Other rows of the step do not wait for it."""
        if not req.xlora:
            return None
        return XLoRAPhase.REAL if req.xlora_scaled > req.num_computed_tokens else XLoRAPhase.SCALING

    def _chunk(self, req: Request, budget: int) -> int:
        """How many tokens ``req`` feeds this step: the rest of its known tokens (within ``budget``); in an X-LoRA's
        real-pass step, the tokens its scaling pass has scored."""
        end = req.xlora_scaled if self._xlora_phase(req) is XLoRAPhase.REAL else req.num_tokens
        return min(end - req.num_computed_tokens, budget)

    def _match_prefix(self, req: Request) -> int:
        """A request that has computed nothing (new, or preempted) starts after the longest cached prefix of its
        tokens computed under its cache key; returns the number of tokens it skips."""
        if req.num_computed_tokens or req.cache_key is None:
            return 0
        cached = self.kv.match_prefix(req.request_id, req.all_token_ids, req.cache_key)
        req.num_computed_tokens = cached
        if req.num_cached_tokens is None:  # reported for the first admission (usage.cached_tokens)
            req.num_cached_tokens = cached
        return cached

    def _allocate(self, req: Request, num_tokens: int) -> bool:
        """Grow every KV track of ``req`` (one, or two for an X-LoRA) to ``num_tokens``, all or none."""
        return self.kv.allocate(req.request_id, num_tokens, *req.kv_ids(req.request_id)[1:])

    def waiting_loras(self, limit: int) -> list[str]:
        """The adapters of queued requests, in queue order, at most ``limit`` distinct."""
        names: dict[str, None] = {}
        for req in self.waiting:
            names.update(dict.fromkeys(req.lora_names))
            if len(names) >= limit:
                break
        return list(names)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.finish(rid, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the step ---------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput(finished_req_ids=self._finished_since_last_step)
        self._finished_since_last_step = []
        chunks: dict[str, int] = {}

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req, budget)
            while not self._allocate(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted_req_ids.append(victim.request_id)
                chunks.pop(victim.request_id, None)
                if victim is req:
                    break
            else:
                chunks[req.request_id] = n
                budget -= n
                i += 1

        if not out.preempted_req_ids:
            while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
                req = self.waiting[0]
                names = set(req.lora_names)
                # FCFS across adapters: the head waits (and blocks those behind it) until its adapters fit.
                if not self.residency.can_hold(names):
                    break
                cached = self._match_prefix(req)
                n = self._chunk(req, budget)
                if not self._allocate(req, req.num_computed_tokens + n):
                    if cached:  # give the shared blocks back; matched again when it fits
                        self.kv.free(req.request_id)
                        req.num_computed_tokens = 0
                    break
                try:
                    self.residency.hold(names)
                except AdapterUnreadable as e:  # fails this request only (finish frees its blocks)
                    out.failed.append(FailedRequest(req.request_id, req.parent_id or req.request_id, str(e)))
                    self.finish(req.request_id, RequestStatus.FINISHED_ABORTED)
                    continue
                self.waiting.popleft()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                chunks[req.request_id] = n
                budget -= n

        for req in self.running:
            n = chunks.get(req.request_id)
            if n is None:
                continue
            start, phase = req.num_computed_tokens, self._xlora_phase(req)
            out.scheduled.append(ScheduledRequest(
                request_id=req.request_id,
                token_ids=req.all_token_ids[start:start + n],
                start_pos=start,
                block_table=self.kv.block_tables[req.kv_ids(req.request_id)[phase is XLoRAPhase.SCALING]],
                sample=start + n == req.num_tokens and phase is not XLoRAPhase.SCALING,
                sampling_params=req.sampling_params,
                seed=None if req.sampling_params.seed is None else req.sampling_params.seed + req.index,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=req.output_token_ids,
                lora_name=req.lora_name,
                lora_mix=req.lora_mix,
                xlora=req.xlora,
                xlora_experts=req.xlora_experts,
                xlora_phase=phase,
                grammar=req.grammar,
            ))
        return out

    def _preempt(self, req: Request) -> None:
        self._leave_running(req)
        self.kv.free(*req.kv_ids(req.request_id))
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = req.xlora_scaled = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(
        self, sched: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[tuple[Request, SampledToken]]:
        """Advance computed counts, append sampled tokens, finish token-level stops. Returns (request, token) pairs."""
        touched = []
        for rid, (first, scores) in result.prompt_logprobs.items():
            req = self.requests.get(rid)
            if req is not None and req.prompt_scores is not None:
                req.prompt_scores[first:first + len(scores)] = scores
        for s in sched.scheduled:
            req = self.requests.get(s.request_id)
            if req is None:  # aborted while the step ran
                continue
            if s.xlora_phase is XLoRAPhase.SCALING:  # its scaling-pass KV track and scores advanced; no token yet
                req.xlora_scaled += s.num_tokens
                continue
            req.num_computed_tokens += s.num_tokens
            self.kv.commit(req.request_id, req.num_computed_tokens, req.cache_key, lambda r=req: r.all_token_ids)
            tok = result.sampled.get(s.request_id)
            if tok is None:
                continue
            req.output_token_ids.append(tok.token_id)
            touched.append((req, tok))
            if req.grammar is not None and not req.grammar.accept(tok.token_id):  # the mask forbids it: a bug
                req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, "grammar_rejected"
                self.finish(req.request_id, req.status)
            elif req.check_token_stop(self.config.max_model_len):
                self.finish(req.request_id, req.status)
        return touched
