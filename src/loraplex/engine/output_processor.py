"""After each step: detokenize new tokens, apply stop strings, collect logprobs, build vLLM-shaped outputs.

Requests with ``n > 1`` are ``n`` engine requests; their outputs are gathered under the parent's id.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from loraplex.request import Request, RequestStatus
from loraplex.scheduler.output import SampledToken


@dataclass
class ParentRequest:
    """A user request: its prompt and its ``n`` children."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None  # built once, when every prompt position is scored

    @property
    def finished(self) -> bool:
        return all(c.status.finished for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentRequest] = {}
        self.detok: dict[str, IncrementalDetokenizer] = {}

    def add(self, parent: ParentRequest) -> None:
        self.parents[parent.request_id] = parent
        for c in parent.children:
            self.detok[c.request_id] = IncrementalDetokenizer(self.tokenizer, c.prompt_token_ids,
                                                              c.sampling_params.skip_special_tokens)

    def process(self, touched: list[tuple[Request, SampledToken]], finish) -> list[RequestOutput]:
        """Update each touched request; ``finish(request_id, status)`` ends one that hit a stop string."""
        parents: dict[str, ParentRequest] = {}
        for req, tok in touched:
            self._append_logprobs(req, tok)
            detok = self.detok[req.request_id]
            delta = detok.step(tok.token_id)
            if req.status.finished:
                delta += detok.flush()
            if delta:
                req.output_text += delta
                if self._hit_stop_string(req, len(delta)):
                    finish(req.request_id, RequestStatus.FINISHED_STOPPED)
            pid = req.parent_id or req.request_id
            parents[pid] = self.parents[pid]
        return [self.make_output(p) for p in parents.values()]

    def abort(self, parent_id: str) -> RequestOutput | None:
        parent = self.parents.get(parent_id)
        return None if parent is None else self.make_output(parent)

    def _entry(self, tok: SampledToken) -> dict[int, Logprob]:
        """The token (first), then its position's top-k alternatives."""
        entry = {tok.token_id: Logprob(tok.logprob, tok.rank, self.tokenizer.decode([tok.token_id]))}
        for rank, (tid, lp) in enumerate(tok.top_logprobs or (), start=1):
            if tid not in entry:
                entry[tid] = Logprob(lp, rank, self.tokenizer.decode([tid]))
        return entry

    def _append_logprobs(self, req: Request, tok: SampledToken) -> None:
        if tok.logprob is None:
            return
        req.cumulative_logprob += tok.logprob
        req.logprobs.append(self._entry(tok))

    def _prompt_logprobs(self, parent: ParentRequest) -> PromptLogprobs | None:
        scores = parent.children[0].prompt_scores if parent.children else None
        if parent.prompt_logprobs is None and scores is not None and all(s is not None for s in scores[1:]):
            parent.prompt_logprobs = [None] + [self._entry(s) for s in scores[1:]]
        return parent.prompt_logprobs

    @staticmethod
    def _hit_stop_string(req: Request, delta_len: int) -> bool:
        sp = req.sampling_params
        if not sp.stop or req.num_output_tokens < sp.min_tokens:
            return False
        text = req.output_text
        start = max(0, len(text) - delta_len - sp.max_stop_len + 1)
        hits = [(i, s) for s in sp.stop if (i := text.find(s, start)) != -1]
        if not hits:
            return False
        i, s = min(hits)
        req.output_text = text[:i + len(s)] if sp.include_stop_str_in_output else text[:i]
        req.stop_reason = s
        return True

    @staticmethod
    def visible_text(req: Request) -> str:
        """While running, hold back a tail that could still grow into a stop string (it must not be streamed)."""
        hold = req.sampling_params.max_stop_len - 1
        if req.status.finished or hold <= 0:
            return req.output_text
        return req.output_text[:max(0, len(req.output_text) - hold)]

    def make_output(self, parent: ParentRequest) -> RequestOutput:
        outs = [CompletionOutput(
            index=c.index, text=self.visible_text(c), token_ids=list(c.output_token_ids),
            cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None,
            logprobs=c.logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
        ) for c in parent.children]
        finished = parent.finished
        if finished:
            self.parents.pop(parent.request_id, None)
            for c in parent.children:
                self.detok.pop(c.request_id, None)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs, finished,
                             prompt_logprobs=self._prompt_logprobs(parent),
                             num_cached_tokens=parent.children[0].num_cached_tokens if parent.children else None)
