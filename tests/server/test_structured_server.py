"""Structured outputs and tool calls over HTTP with the openai SDK (and TGI / SGLang bodies): base, adapter,
mixture and auto-routed rows in one batch, each constrained on its own; bad constraints are 400s naming the field."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field

from tests.conftest import save_tiny_adapter, save_tiny_model
from tests.engine.test_structured import PET
from tests.server.conftest import ADAPTERS, RunningServer

MSGS = [{"role": "user", "content": "Describe a pet."}]
MAX = 300
WEATHER = {"type": "object", "properties": {"city": {"enum": ["paris", "rome"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 9}},
           "required": ["city", "days"], "additionalProperties": False}
FLAG = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "set_flag", "parameters": FLAG}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Owner(BaseModel):
    name: str = Field(max_length=4)


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=30)
    tags: list[Literal["a", "b"]] = Field(max_length=3)
    owner: Owner


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    save_tiny_model("llama", root / "m", max_position_embeddings=4096)  # room for a tool list in the prompt
    for i, name in enumerate(("a4", "a16")):
        save_tiny_adapter(root / "m", root / name, seed=20 + i, **ADAPTERS[name])
    s = RunningServer([str(root / "m"), "--served-model-name", "tiny", "--max-model-len", "2048",
                       "--lora-modules", f"a4={root / 'a4'}", f"a16={root / 'a16'}"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    return OpenAI(base_url=srv.url + "/v1", api_key="none")


def test_parse_pydantic_for_base_adapter_mixture_and_auto_concurrently(srv):
    client = AsyncOpenAI(base_url=srv.url + "/v1", api_key="none")
    rows = [("tiny", {}), ("a4", {}), ("tiny", {"adapters": [{"name": "a4", "weight": 0.5},
                                                             {"name": "a16", "weight": 0.5}]}),
            ("auto", {}), ("a16", {"seed": 7})]

    async def one(model, extra):
        return await client.chat.completions.parse(model=model, messages=MSGS, response_format=Pet, max_tokens=MAX,
                                                   temperature=1.0 if extra.get("seed") else 0,
                                                   extra_body={k: v for k, v in extra.items() if k != "seed"},
                                                   seed=extra.get("seed"))

    async def all_rows():
        return await asyncio.gather(*(one(m, e) for m, e in rows))

    for r in asyncio.run(all_rows()):
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(r.choices[0].message.parsed, Pet)


def test_json_schema_outputs_validate_plain_sampled_and_streamed(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
    r = client.chat.completions.create(model="a4", messages=MSGS, response_format=fmt, max_tokens=MAX, n=3,
                                       temperature=1.0, seed=1)
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), PET)
    greedy = client.chat.completions.create(model="a16", messages=MSGS, response_format=fmt, max_tokens=MAX,
                                            temperature=0)
    chunks = client.chat.completions.create(model="a16", messages=MSGS, response_format=fmt, max_tokens=MAX,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy.choices[0].message.content
    obj = client.completions.create(model="tiny", prompt="x", max_tokens=MAX, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].text), dict)
    else:  # a random model may write an object that never closes: then it is cut at max_tokens
        assert obj.choices[0].finish_reason == "length" and obj.choices[0].text.startswith("{")


def test_vllm_tgi_and_sglang_constraint_fields(client, srv):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20,
                                       extra_body={"guided_choice": ["yes", "no way"]})
    assert r.choices[0].message.content in ("yes", "no way") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="a4", prompt="id", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", r.choices[0].text)
    r = client.completions.create(model="a4", prompt="id", max_tokens=40, temperature=0,
                                  extra_body={"guided_grammar": 'root ::= "(" [a-z] ("+" [a-z])? ")"'})
    assert re.fullmatch(r"\([a-z](\+[a-z])?\)", r.choices[0].text)
    r = client.completions.create(model="tiny", prompt="id", max_tokens=MAX, temperature=0,
                                  extra_body={"guided_json": json.dumps(PET)})
    jsonschema.validate(json.loads(r.choices[0].text), PET)
    tgi = httpx.post(srv.url + "/generate", json={"inputs": "n", "parameters": {
        "max_new_tokens": 10, "grammar": {"type": "regex", "value": "[0-9]{4}"}}}).json()
    assert re.fullmatch("[0-9]{4}", tgi["generated_text"].removesuffix("</s>"))
    tgi = httpx.post(srv.url + "/generate", json={"inputs": "n", "parameters": {
        "max_new_tokens": MAX, "grammar": {"type": "json", "value": PET}}}).json()
    jsonschema.validate(json.loads(tgi["generated_text"].removesuffix("</s>")), PET)
    sgl = httpx.post(srv.url + "/generate", json={"text": "n", "sampling_params": {
        "max_new_tokens": 10, "regex": "[a-c]{5}"}}).json()
    assert re.fullmatch("[a-c]{5}", sgl["text"])


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def _streamed_calls(chunks) -> tuple[list[tuple[str, dict]], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for ch in chunks:
        if not ch.choices:
            continue
        finish = ch.choices[0].finish_reason or finish
        for tc in ch.choices[0].delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            c["name"] += (tc.function.name or "") if tc.function else ""
            c["arguments"] += (tc.function.arguments or "") if tc.function else ""
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_flag"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_validate_and_stream_the_same(client, choice):
    kw = dict(model="a4", messages=MSGS, tools=TOOLS, tool_choice=choice, max_tokens=MAX, temperature=0,
              parallel_tool_calls=False)
    r = client.chat.completions.create(**kw)
    calls = _calls(r.choices[0].message)
    assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls"
    for name, args in calls:
        jsonschema.validate(args, SCHEMAS[name])
    if isinstance(choice, dict):
        assert calls[0][0] == "set_flag"
    assert _streamed_calls(client.chat.completions.create(**kw, stream=True)) == (calls, "tool_calls")


def test_auto_tool_call_is_parsed_from_the_models_own_format(client):
    """``auto``: the model's text is parsed (Hermes here). A regex makes the random model write a call."""
    regex = r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(paris|rome)", "days": [1-9]\}\}\n</tool_call>'
    kw = dict(model="tiny", messages=MSGS, tools=TOOLS, max_tokens=MAX, temperature=0, extra_body={"guided_regex": regex})
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.content == "Checking." and r.choices[0].finish_reason == "tool_calls"
    (name, args), = _calls(msg)
    assert name == "get_weather"
    jsonschema.validate(args, WEATHER)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking."
    assert _streamed_calls(chunks) == ([(name, args)], "tool_calls")
    plain = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, max_tokens=8, temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"


def test_tool_history_round_trips_through_the_template(client):
    msgs = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "set_flag", "arguments": '{"on": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_grammar": "root ::= nowhere"}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
])
def test_bad_constraints_are_400s_naming_the_field(srv, body, param):
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tgi_and_sglang_bad_constraints(srv):
    r = httpx.post(srv.url + "/generate", json={"inputs": "n", "parameters": {"grammar": {"type": "regex",
                                                                                          "value": "(ab"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "parameters.grammar.value"
    r = httpx.post(srv.url + "/generate", json={"text": "n", "sampling_params": {"regex": "a", "ebnf": "root ::= x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.ebnf"


def test_cannot_finish_within_max_tokens_is_length(client, srv):
    r = client.completions.create(model="tiny", prompt="x", max_tokens=6, extra_body={"guided_regex": "b{40}"})
    assert r.choices[0].text == "bbbbbb" and r.choices[0].finish_reason == "length"
    assert srv.idle()
