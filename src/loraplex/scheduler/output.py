"""The only contract between scheduler and model runner (pure Python, no torch).

The scheduler says, per request, which tokens to feed this step and where their K/V go; the runner answers with
one sampled token per request whose prompt is fully computed.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from loraplex.lora.request import UsesAdapters
from loraplex.sampling_params import GrammarState, SamplingParams


class XLoRAPhase(enum.Enum):
    """Which pass an X-LoRA row runs this step."""

    SCALING = "scaling"  # on the request's second KV track, experts at scaling_pass_value; scores, never samples
    REAL = "real"  # on its own track, experts weighted by the scores of its scaling pass


@dataclass(frozen=True)
class ScheduledRequest(UsesAdapters):
    """One request's share of a step.

    ``token_ids`` sit at positions ``start_pos .. start_pos + len(token_ids) - 1``; ``block_table`` covers them.
    ``sample`` is True when this chunk reaches the end of the known tokens, so a next token is drawn.
    ``prompt_token_ids``/``output_token_ids`` are read by penalties only (shared, not copied).
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    sampling_params: SamplingParams
    seed: int | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    lora_name: str | None = None
    lora_mix: tuple[tuple[str, float], ...] = ()
    xlora: str | None = None
    xlora_experts: tuple[str, ...] = ()
    xlora_phase: XLoRAPhase | None = None  # X-LoRA rows only
    grammar: GrammarState | None = None  # constrained decoding: masks this row's next token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class FailedRequest(NamedTuple):
    """A request that failed at admission (its adapter could not be read); ``parent_id`` groups ``n`` siblings."""

    request_id: str
    parent_id: str
    error: str


@dataclass
class SchedulerOutput:
    """What to run this step. ``finished_req_ids`` lets the runner drop per-request state (RNGs); ``failed`` lists
    requests that could not be admitted and are finished already."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)
    failed: list[FailedRequest] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass(frozen=True)
class SampledToken:
    """A drawn token with its raw log-probability and, if asked, the top-k alternatives."""

    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass
class ModelRunnerOutput:
    """One ``SampledToken`` per scheduled request with ``sample=True``; for requests that asked for prompt
    log-probabilities, ``prompt_logprobs[id] = (position of the first scored prompt token, one SampledToken per
    prompt token of the chunk that was scored)``."""

    sampled: dict[str, SampledToken] = field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[SampledToken]]] = field(default_factory=dict)
