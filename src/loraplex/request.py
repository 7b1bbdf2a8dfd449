"""The engine's per-sequence state (pure Python, no torch).

A user request with ``n > 1`` fans out into ``n`` :class:`Request` objects sharing a ``parent_id``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from loraplex.lora.request import UsesAdapters
from loraplex.outputs import SampleLogprobs
from loraplex.sampling_params import GrammarState, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(eq=False)  # identity semantics: two requests are never "equal"
class Request(UsesAdapters):
    """One sequence: prompt + generated tokens, how many of them are already in the KV cache, and its status.

    NOTE: ``num_computed_tokens`` counts tokens whose K/V are in the cache. The tokens still to feed the model
    are ``all_token_ids[num_computed_tokens:]``; preemption resets it to 0 (recompute).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    prompt: str | None = None
    lora_name: str | None = None  # None = the base model (or a mixture, see lora_mix)
    lora_mix: tuple[tuple[str, float], ...] = ()  # a weighted set of adapters: Σ w_i · B_i A_i x
    xlora: str | None = None  # an X-LoRA: its experts are mixed per token by its classifier
    xlora_experts: tuple[str, ...] = ()
    xlora_scaled: int = 0  # X-LoRA: tokens through the scaling pass (its KV track); ≥ num_computed_tokens
    parent_id: str | None = None
    index: int = 0  # which of the parent's n completions
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Filled by the output processor.
    output_text: str = ""
    logprobs: SampleLogprobs | None = None
    prompt_scores: list | None = None  # prompt_logprobs: a SampledToken per prompt position (None for the first)
    cache_key: object | None = None  # what computes its K/V, for prefix caching (None: never cached)
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at its first admission
    cumulative_logprob: float = 0.0
    grammar: GrammarState | None = None  # constrained decoding: advanced by every appended token

    def __post_init__(self) -> None:
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_scores = [None] * len(self.prompt_token_ids)

    def rename_adapter(self, old: str, new: str) -> None:
        """The adapter ``old`` this request uses is now known as ``new`` (its weights were swapped in place)."""
        if self.lora_name == old:
            self.lora_name = new
        self.lora_mix = tuple((new if n == old else n, w) for n, w in self.lora_mix)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def check_token_stop(self, max_model_len: int) -> bool:
        """After appending a token: set a finished status if a token-level stop condition holds."""
        sp = self.sampling_params
        last = self.output_token_ids[-1]
        if self.grammar is not None and self.grammar.is_terminated():  # the constrained text is complete
            self.status = RequestStatus.FINISHED_STOPPED
            return True
        if self.num_output_tokens >= sp.min_tokens:
            if not sp.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in sp.stop_token_ids:
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, last
                return True
        if (sp.max_tokens is not None and self.num_output_tokens >= sp.max_tokens) or self.num_tokens >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
