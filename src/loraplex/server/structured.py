"""Structured outputs as each API spells them, mapped to one :class:`StructuredOutputsParams`.

OpenAI ``response_format`` (``json_object``, ``json_schema``); vLLM's ``structured_outputs`` and its older
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``; TGI's ``parameters.grammar``; SGLang's
``sampling_params.json_schema`` / ``regex`` / ``ebnf``. A request sets at most one of them (else a 400 naming the
second); the compile check (a 400 naming the field for a schema, regex or grammar that does not compile) is
:meth:`ServerState.compile_grammar`.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.sampling_params import StructuredOutputsParams
from loraplex.server.errors import bad_request
from loraplex.server.openapi import exactly_one

GUIDED_BACKENDS = (None, "auto", "xgrammar")  # vLLM's guided_decoding_backend values served here


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: ``{"name", "description"?, "schema"?, "strict"?}``."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class VLLMStructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` request field (the constraint kinds served; ``structural_tag`` is not)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=exactly_one(
        {"json": {"type": ["object", "string"]}, "regex": {"type": "string"}, "choice": {"type": "array"},
         "grammar": {"type": "string"}, "json_object": {"const": True}}, unset={"json_object": [False]}))
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None


class TGIGrammar(BaseModel):
    """TGI's ``parameters.grammar``: ``{"type": "json", "value": schema}`` | ``{"type": "regex", "value": str}`` |
    ``{"type": "json_schema", "value": {"schema": …, "name"?}}``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["json", "regex", "json_schema"]
    value: dict[str, Any] | str


def _schema(value, param: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise bad_request(f"{param}: not valid JSON: {e}", param) from None
    if not isinstance(value, dict):
        raise bad_request(f"{param}: a JSON schema must be an object", param)
    return value


def _make(param: str, **kw) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kw)
    except ValueError as e:
        raise bad_request(f"{param}: {str(e).split(': ', 1)[-1]}", param) from None


def openai_constraint(extra: dict, response_format: ResponseFormat | None,
                      structured: VLLMStructuredOutputs | None) -> tuple[StructuredOutputsParams, str] | None:
    """The one constraint of a chat/completions body, with the field it came from (``extra``: vLLM's guided_*)."""
    found: list[tuple[StructuredOutputsParams, str]] = []
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object" or (response_format.json_schema is not None
                                                     and response_format.json_schema.json_schema is None):
            found.append((_make("response_format", json_object=True), "response_format"))
        elif response_format.json_schema is None:
            raise bad_request("response_format.json_schema: required when type is 'json_schema'",
                              "response_format.json_schema")
        else:
            found.append((_make("response_format", json=response_format.json_schema.json_schema),
                          "response_format.json_schema.schema"))
    if structured is not None:
        kw = {k: v for k, v in structured.model_dump(by_alias=True).items() if v not in (None, False)}
        found.append((_make("structured_outputs", **kw), "structured_outputs"))
    backend = extra.get("guided_decoding_backend")
    if backend not in GUIDED_BACKENDS:
        raise bad_request(f"guided_decoding_backend: only {GUIDED_BACKENDS[1:]} are served", "guided_decoding_backend")
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        value = extra.get(name)
        if value is None:
            continue
        if key == "json":
            value = _schema(value, name)
        elif key == "choice" and not isinstance(value, list):
            raise bad_request(f"{name}: must be a list of strings", name)
        elif key != "choice" and not isinstance(value, str):
            raise bad_request(f"{name}: must be a string", name)
        found.append((_make(name, **{key: value}), name))
    if len(found) > 1:
        raise bad_request(f"{found[1][1]}: only one structured-output constraint per request (also "
                          f"{found[0][1]})", found[1][1].split(".")[0])
    return found[0] if found else None


def tgi_constraint(grammar: TGIGrammar | None) -> tuple[StructuredOutputsParams, str] | None:
    if grammar is None:
        return None
    param = "parameters.grammar.value"
    if grammar.type == "regex":
        if not isinstance(grammar.value, str):
            raise bad_request(f"{param}: a regex is a string", param)
        return _make(param, regex=grammar.value), param
    value = _schema(grammar.value, param)
    if grammar.type == "json_schema":
        if "schema" not in value:
            raise bad_request(f"{param}: json_schema takes {{'schema': …, 'name'?: …}}", param)
        value = _schema(value["schema"], param + ".schema")
    return _make(param, json=value), param


def sglang_constraint(json_schema: str | None, regex: str | None, ebnf: str | None
                      ) -> tuple[StructuredOutputsParams, str] | None:
    given = [(n, v) for n, v in (("json_schema", json_schema), ("regex", regex), ("ebnf", ebnf)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise bad_request("sampling_params: set one of json_schema, regex, ebnf", f"sampling_params.{given[1][0]}")
    name, value = given[0]
    param = f"sampling_params.{name}"
    if name == "json_schema":
        return _make(param, json=_schema(value, param)), param
    return _make(param, **({"regex": value} if name == "regex" else {"grammar": value})), param
