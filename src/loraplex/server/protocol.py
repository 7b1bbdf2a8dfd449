"""Request bodies of the OpenAI, TGI and admin APIs (pydantic, strict: ``true`` is not a number, ``"1"`` not an
integer — what the OpenAPI document says is what is accepted), and their mapping to :class:`SamplingParams`.

Fields OpenAI or vLLM clients send and that we honour are declared; fields that would change the result and that we
do not implement (``logit_bias``, ``functions``, …) are refused with a 400 naming them; anything else unknown
(``user``, ``metadata``, …) does not affect generation and is accepted.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from loraplex.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams
from loraplex.server.errors import bad_request
from loraplex.server.structured import (
    ResponseFormat,
    TGIGrammar,
    VLLMStructuredOutputs,
    openai_constraint,
    sglang_constraint,
    tgi_constraint,
)
from loraplex.server.tools import ChatTool, ToolChoice

MAX_N = 16
MAX_STOP_SEQUENCES = 16  # TGI parameters.stop (advertised by /info)
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, strict=True)]], Field(min_length=1)]
UNSUPPORTED = ("functions", "function_call", "logit_bias", "suffix", "allowed_token_ids", "bad_words",
               "logits_processors", "truncate_prompt_tokens", "guided_whitespace_pattern")
# vLLM sampling fields with a default we follow and other values we do not implement: refused, never ignored
UNSUPPORTED_VALUES = {"use_beam_search": False, "length_penalty": 1.0, "early_stopping": False,
                      "spaces_between_special_tokens": True, "return_tokens_as_token_ids": False}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, [], {}):
                raise bad_request(f"{name}: not supported by this server", name)
        for name, default in UNSUPPORTED_VALUES.items():
            if extra.get(name) not in (None, default):
                raise bad_request(f"{name}: only {default!r} is supported by this server", name)


class AdapterWeight(BaseModel):
    """One member of a per-request mixture: ``{"name": "law", "weight": 0.7}``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1)
    weight: float


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class _Sampling(_Body):
    """Sampling fields shared by chat and completions (OpenAI names plus vLLM's extras)."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    best_of: int | None = None
    # vLLM extras
    top_k: int = -1
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # adapter selection besides ``model``: SGLang / seed 000 and TGI names
    lora_path: str | None = None
    adapter_id: str | None = None
    adapters: list[AdapterWeight] | None = Field(default=None, min_length=1)  # a weighted mixture
    # structured outputs: OpenAI's, vLLM's (guided_json, guided_regex, … are read from the extra fields)
    response_format: ResponseFormat | None = None
    structured_outputs: VLLMStructuredOutputs | None = None

    def constraint(self):
        """The request's structured-output constraint and the field it came from, or None."""
        return openai_constraint(self.model_extra or {}, self.response_format, self.structured_outputs)

    def sampling_params(self, max_tokens: int | None, prompt_len: int, max_model_len: int,
                        logprobs: int | None, prompt_logprobs: int | None = None,
                        structured: StructuredOutputsParams | None = None,
                        skip_special_tokens: bool | None = None) -> SamplingParams:
        """Check the length budget (400 naming max_tokens) and build the engine's parameters."""
        if self.best_of not in (None, self.n):
            raise bad_request("best_of: only best_of == n is supported", "best_of")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options: only allowed when stream is true", "stream_options")
        room = max_model_len - prompt_len
        if room < 1:
            raise bad_request(f"prompt: {prompt_len} tokens leave no room to generate within max_model_len "
                              f"{max_model_len}", "prompt")
        if max_tokens is not None and max_tokens > room:
            raise bad_request(f"max_tokens: {max_tokens} + {prompt_len} prompt tokens exceed max_model_len "
                              f"{max_model_len}", "max_tokens")
        try:
            return SamplingParams(
                n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, seed=self.seed, max_tokens=max_tokens or room,
                min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
                logprobs=logprobs, structured_outputs=structured,
                prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs)
        except ValueError as e:
            raise bad_request(str(e), str(e).split(":")[0]) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call it answers
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise bad_request(f"messages: content parts of type {part.get('type')!r} are not supported",
                                  "messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as chat templates take them (role, content, and tool fields where given)."""
        return [{"role": m.role, "content": m.text(),
                 **{k: v for k, v in (("tool_calls", m.tool_calls), ("tool_call_id", m.tool_call_id),
                                      ("name", m.name)) if v is not None}} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class MergedAdapters(BaseModel):
    """LoRAX's per-request merge: ``linear`` (our mixture) is the one strategy served."""

    model_config = ConfigDict(extra="allow", strict=True)
    ids: list[str] = Field(min_length=1)
    weights: list[float] = Field(min_length=1)
    merge_strategy: str | None = None


class TGIParameters(_Body):
    adapter_id: str | None = None
    adapter_source: str | None = None  # LoRAX: "local" = adapter_id is a directory
    merged_adapters: MergedAdapters | None = None  # LoRAX
    adapters: list[AdapterWeight] | None = Field(default=None, min_length=1)
    ignore_eos_token: bool = False  # LoRAX
    return_k_alternatives: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # LoRAX
    max_new_tokens: int | None = Field(default=None, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None
    repetition_penalty: float | None = Field(default=None, gt=0)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    stop: list[NonEmptyStr] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool | None = False
    top_n_tokens: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=1)  # one sequence per request here
    truncate: int | None = None
    watermark: bool = False
    typical_p: float | None = None
    grammar: TGIGrammar | None = None

    def constraint(self):
        return tgi_constraint(self.grammar)


class TGIGenerateRequest(_Body):
    inputs: str = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class SGLangSamplingParams(BaseModel):
    """SGLang's ``sampling_params`` (the fields served; anything else is a 400 naming it)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_new_tokens: int | None = Field(default=None, ge=1)
    min_new_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = -1
    min_p: float = Field(default=0.0, ge=0, le=1)
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = Field(default=1.0, gt=0)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    n: int = Field(default=1, ge=1, le=MAX_N)
    skip_special_tokens: bool = True
    seed: int | None = None
    no_stop_trim: bool = Field(default=False, le=False)  # only the default is served
    spaces_between_special_tokens: bool = Field(default=True, ge=True)
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    def constraint(self):
        return sglang_constraint(self.json_schema, self.regex, self.ebnf)


class SGLangGenerateRequest(_Body):
    """SGLang's native ``POST /generate``: ``text`` or ``input_ids`` (exactly one), ``sampling_params``,
    ``lora_path``."""

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"oneOf": [
        {"required": ["text"], "properties": {"text": {"type": "string"}}},
        {"required": ["input_ids"], "properties": {"input_ids": {"type": "array"}}}]})
    text: str | None = Field(default=None, min_length=1)
    input_ids: TokenIds | None = None
    sampling_params: SGLangSamplingParams = Field(default_factory=SGLangSamplingParams)
    lora_path: str | None = None
    stream: bool = False
    return_logprob: bool = False


NO_NUL = r"^[^\x00]*$"  # names and paths that reach the file system: a NUL byte is refused as a 400, never a 500


class LoadLoRARequest(_Body):
    lora_name: str = Field(min_length=1, pattern=NO_NUL)
    lora_path: str | None = Field(default=None, min_length=1, pattern=NO_NUL)  # absent: the resolvers (--adapter-dir,
    # demo names)
    load_inplace: bool = False  # a known name gets the new weights (vLLM)
    description: str | None = None
    examples: list[str] | None = None
    pinned: bool = False
    base_model_name: str | None = None  # vLLM's; "" or absent: the served base. Another base is a 400.


class UnloadLoRARequest(_Body):
    lora_name: str = Field(min_length=1)
    wait: bool = False

