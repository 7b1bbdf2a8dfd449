"""Per-request sampling parameters with vLLM's names and validation (pure Python, no torch)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's shape; exactly one field set): ``json`` — a JSON schema (dict or
    its text); ``json_object`` — any JSON object; ``regex``; ``choice`` — one of these strings; ``grammar`` — an
    EBNF (GBNF) grammar whose start rule is ``root``. Compiled by xgrammar; checked when the request is added."""

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    any_whitespace: bool = False  # JSON: compact output (a random model cannot pad it with whitespace forever)

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        set_ = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        set_ += ["json_object"] if self.json_object else []
        if len(set_) != 1:
            raise ValueError(f"structured_outputs: exactly one of json, regex, choice, grammar, json_object must be "
                             f"set, got {set_ or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice: must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"structured_outputs.{name}: must be a string")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError("structured_outputs.json: must be a JSON schema (an object or its text)")

    @property
    def key(self) -> tuple:
        """What identifies the compiled grammar (the compile cache's key)."""
        schema = self.json if not isinstance(self.json, dict) else json.dumps(self.json, sort_keys=True)
        return (schema, self.regex, self.choice, self.grammar, self.json_object, self.any_whitespace)


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name


class GrammarState(Protocol):
    """One sequence's position in its grammar (the sampler masks with it, the scheduler advances it)."""

    def fill_bitmask(self, bitmask: Any, row: int) -> None: ...
    def accept(self, token_id: int) -> bool: ...
    def is_terminated(self) -> bool: ...


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    ``temperature == 0`` means greedy. Penalties follow vLLM: ``repetition_penalty`` looks at prompt and output,
    ``presence_penalty``/``frequency_penalty`` at the output only. ``seed`` makes sampling reproducible whatever
    else is in the batch. ``logprobs=k`` returns the top-k (k <= 20) log-probabilities of every generated token.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the prompt tokens' log-probabilities (and this many alternatives each)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (JSON schema, regex, …)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:  # vLLM accepts -1 for "off"
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid parameter."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.temperature is None or self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int):
            bad("top_k", "must be an integer (0 or -1 disables it)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", "must be in [0, max_tokens]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad("logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            bad("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs", "must be a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)
