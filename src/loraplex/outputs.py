"""Results shaped like vLLM's: ``RequestOutput.outputs[i].text`` etc. (pure Python, no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token at one position, its rank in the distribution and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated position: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
def most_likely(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The ``k`` most likely tokens at one position (``(token id, Logprob)``, most likely first); the chosen token is
    among them when its rank is ``<= k``."""
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank and lp.rank <= k), key=lambda x: x[1].rank)


# One per prompt position, None for the first (nothing predicts it): the prompt token plus the top-k.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything produced for one request so far (cumulative, not a delta)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: PromptLogprobs | None = None  # when SamplingParams.prompt_logprobs is set
    num_cached_tokens: int | None = None  # prompt tokens taken from the prefix cache (known once admitted)
    lora_request: object | None = None
    error: str | None = None  # set when the engine could not serve it (e.g. its adapter became unreadable)
    route: object | None = None  # routing.RouteDecision when lora_request="auto" chose the adapter
