"""Tool-call parsers and the streaming of tool calls: what ``tool_choice: "auto"`` turns a model's text into."""
from __future__ import annotations

import json

import pytest

from loraplex.server.tool_parsers import PARSERS, ToolCall, parser_for
from loraplex.server.tools import ChatTool, ToolPlan, ToolStream, embed_schema, plan_tools, render_messages

CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
ARGS = json.dumps({"city": "Paris", "days": 3})
CASES = {
    "hermes": [(f"<tool_call>\n{CALL}\n</tool_call>", None, [ToolCall("get_weather", ARGS)]),
               (f"Let me look.\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>{CALL}</tool_call>", "Let me look.",
                [ToolCall("get_weather", ARGS)] * 2),
               (f"<tool_call>\n{CALL}", None, [ToolCall("get_weather", ARGS)]),  # EOS before the closing tag
               ("It is sunny.", "It is sunny.", []),
               ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", [])],
    "llama3_json": [('{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', None,
                     [ToolCall("get_weather", ARGS)]),
                    (f"<|python_tag|>{CALL}; {CALL}", None, [ToolCall("get_weather", ARGS)] * 2),
                    ("The weather is fine.", "The weather is fine.", []),
                    ('{"no_name": 1}', '{"no_name": 1}', [])],
    "mistral": [(f"[TOOL_CALLS] [{CALL}]</s>", None, [ToolCall("get_weather", ARGS)]),
                (f"Sure. [TOOL_CALLS] [{CALL}, {CALL}]", "Sure.", [ToolCall("get_weather", ARGS)] * 2),
                ("No tools needed.", "No tools needed.", [])],
}


@pytest.mark.parametrize("name,text,content,calls", [(n, *c) for n, cs in CASES.items() for c in cs])
def test_parse(name, text, content, calls):
    assert PARSERS[name].parse(text) == (content, calls)


@pytest.mark.parametrize("name,text,content,calls", [(n, *c) for n, cs in CASES.items() for c in cs])
def test_streaming_reassembles_to_the_parse(name, text, content, calls):
    """Fed one character at a time, the deltas add up to the same content and calls; no call text leaks out as
    content before the call is known."""
    plan = ToolPlan("auto", [], parser=PARSERS[name])
    stream, deltas = ToolStream(plan), []
    for i in range(1, len(text) + 1):
        deltas += stream.feed(text[:i], i == len(text))
    streamed = "".join(d.get("content", "") for d in deltas)
    got_calls = [tc["function"] for d in deltas for tc in d.get("tool_calls", [])]
    assert [ToolCall(c["name"], c["arguments"]) for c in got_calls] == calls
    assert streamed == (content or "") if calls else streamed == text
    assert [tc["index"] for d in deltas for tc in d.get("tool_calls", [])] == list(range(len(calls)))


def test_named_call_streams_its_arguments():
    plan = ToolPlan("named", [], named="f")
    stream, text = ToolStream(plan), '{"a": [1, 2]}'
    deltas = [d for i in range(1, len(text) + 1) for d in stream.feed(text[:i], i == len(text))]
    head = deltas[0]["tool_calls"][0]
    assert head["function"] == {"name": "f", "arguments": ""} and head["id"].startswith("call_")
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == text


def test_parser_chosen_by_the_template_or_the_flag():
    assert parser_for(None).name == "hermes"
    assert parser_for("{% if tools %}...<tool_call>...{% endif %}").name == "hermes"
    assert parser_for("... <|python_tag|> ...").name == "llama3_json"
    assert parser_for("... [TOOL_CALLS] ...").name == "mistral"
    assert parser_for("[TOOL_CALLS]", configured="hermes").name == "hermes"


def test_embed_schema_moves_defs_and_refs():
    schema = {"type": "object", "properties": {"o": {"$ref": "#/$defs/Owner"}, "p": {"$ref": "#/definitions/P"}},
              "$defs": {"Owner": {"type": "object", "properties": {"q": {"$ref": "#/$defs/Owner"}}}},
              "definitions": {"P": {"type": "integer"}}}
    defs: dict = {}
    out = embed_schema(schema, "t0_", defs)
    assert out == {"type": "object", "properties": {"o": {"$ref": "#/$defs/t0_Owner"}, "p": {"$ref": "#/$defs/t0_P"}}}
    assert defs == {"t0_Owner": {"type": "object", "properties": {"q": {"$ref": "#/$defs/t0_Owner"}}},
                    "t0_P": {"type": "integer"}}


def _tool(name: str) -> ChatTool:
    return ChatTool.model_validate({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}})


def test_render_messages_without_template_support_writes_hermes():
    plan = plan_tools([_tool("f")], "auto", True, "{{ messages }}", None)
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    conv, tools = render_messages(msgs, plan, "{{ messages }}")
    assert tools is None and conv[0]["role"] == "system" and '"name": "f"' in conv[0]["content"]
    assert conv[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'}
    assert conv[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    native, tools = render_messages(msgs, plan, "{% for t in tools %}{% endfor %}")
    assert tools[0]["function"]["name"] == "f" and native[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
