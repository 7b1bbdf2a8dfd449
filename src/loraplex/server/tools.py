"""OpenAI tool calling on chat: ``tools`` + ``tool_choice`` (``none`` | ``auto`` | ``required`` | a named function).

The chat template gets the tools (``apply_chat_template(tools=…)``); a template that knows no tools gets them in a
system message that describes the Hermes ``<tool_call>`` format. ``auto``: the model decides, its text is parsed
(:mod:`loraplex.server.tool_parsers`). ``required`` and a named function are enforced by a JSON-schema grammar, as
vLLM does: a named call's output *is* its arguments object; ``required`` writes ``[{"name", "parameters"}, …]``.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.sampling_params import StructuredOutputsParams
from loraplex.server.errors import bad_request
from loraplex.server.tool_parsers import HermesParser, ToolCall, parser_for

ANY_OBJECT = {"type": "object"}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass
class ToolPlan:
    """How one chat request uses its tools."""

    mode: Literal["none", "auto", "required", "named"]
    tools: list[ChatTool] = field(default_factory=list)
    named: str | None = None
    parallel: bool = True
    parser: Any = None  # a tool_parsers parser (auto mode)

    @property
    def in_prompt(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    def schemas(self) -> list[tuple[StructuredOutputsParams, str]]:
        """Each tool's parameters as a constraint (to check them), with the field it came from."""
        return [(StructuredOutputsParams(json=t.function.parameters), f"tools[{i}].function.parameters")
                for i, t in enumerate(self.tools) if t.function.parameters is not None]

    def constraint(self) -> tuple[StructuredOutputsParams, str] | None:
        """The grammar that enforces ``required`` / a named function (None for ``auto`` / ``none``)."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.named)
            return StructuredOutputsParams(json=tool.function.parameters or ANY_OBJECT), "tool_choice"
        if self.mode != "required":
            return None
        defs: dict = {}
        items = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                   "parameters": embed_schema(t.function.parameters or ANY_OBJECT,
                                                                              f"tool{i}_", defs)},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for i, t in enumerate(self.tools)]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}, **({"$defs": defs} if defs else {})}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema), "tools"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The final text → (content, calls)."""
        if self.mode == "named":
            return None, [ToolCall(self.named, text)]
        if self.mode == "required":
            try:
                calls = [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                         for c in json.loads(text)]
            except (json.JSONDecodeError, KeyError, TypeError):
                return text, []  # cut short by max_tokens: what was written is returned as content
            return None, calls
        if self.mode == "auto":
            return self.parser.parse(text)
        return text, []


def embed_schema(schema: dict, prefix: str, defs: dict) -> dict:
    """``schema`` made fit to sit inside another one: its ``$defs`` / ``definitions`` move into ``defs`` under
    ``prefix``-ed names and its local ``$ref`` s follow them."""
    own = {**schema.get("definitions", {}), **schema.get("$defs", {})}

    def walk(node):
        if isinstance(node, list):
            return [walk(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items() if k not in ("$defs", "definitions")}
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref == "#":
                raise bad_request("tools: a recursive parameters schema ($ref '#') is not supported", "tools")
            for base in ("#/$defs/", "#/definitions/"):
                if ref.startswith(base):
                    out["$ref"] = "#/$defs/" + prefix + ref[len(base):]
        return out

    for name, sub in own.items():
        defs[prefix + name] = walk(sub)
    return walk(schema)


def plan_tools(tools: list[ChatTool] | None, tool_choice, parallel: bool, chat_template: str | None,
               configured_parser: str | None) -> ToolPlan:
    """Validate ``tools`` / ``tool_choice`` (400 naming the field) and decide how the request uses them."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice: only allowed when tools are given", "tool_choice")
        return ToolPlan("none")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools: two tools have the same function name", "tools")
    if isinstance(tool_choice, NamedToolChoice):
        if tool_choice.function.name not in names:
            raise bad_request(f"tool_choice: no tool named {tool_choice.function.name!r} in tools", "tool_choice")
        return ToolPlan("named", tools, tool_choice.function.name, parallel)
    mode = tool_choice or "auto"
    return ToolPlan(mode, tools, None, parallel, parser_for(chat_template, configured_parser))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_json(calls: list[ToolCall]) -> list[dict]:
    return [{"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


# ---- the prompt --------------------------------------------------------------------------------------------------
def template_knows_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def tools_system_text(tools: list[ChatTool]) -> str:
    """What a model whose template knows no tools is told (the Hermes format, parsed back by HermesParser)."""
    specs = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    p = HermesParser
    return ("Functions you can call are listed below, one JSON signature per line, between <tools> and </tools>.\n"
            f"<tools>\n{specs}\n</tools>\n"
            "To call one, answer with a JSON object holding its name and its arguments, wrapped like this:\n"
            f'{p.open}\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n{p.close}')


def _arguments(raw) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def render_messages(messages: list[dict], plan: ToolPlan, chat_template: str | None) -> tuple[list[dict], list | None]:
    """(conversation, tools for the template). Assistant ``tool_calls`` get their arguments as objects (the
    templates' convention); for a template without tool support, tool traffic is written out in Hermes form."""
    native = template_knows_tools(chat_template)
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            calls = [{**c, "function": {**c.get("function", {}), "arguments": _arguments(c.get("function", {})
                                                                                           .get("arguments"))}}
                     for c in calls]
            if native:
                m["tool_calls"] = calls
            else:
                m.pop("tool_calls")
                written = "\n".join(f"{HermesParser.open}\n" + json.dumps(
                    {"name": c["function"].get("name"), "arguments": c["function"]["arguments"]},
                    ensure_ascii=False) + f"\n{HermesParser.close}" for c in calls)
                m["content"] = "\n".join(x for x in (m.get("content") or "", written) if x)
        if m.get("role") == "tool" and not native:
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    if not plan.in_prompt:
        return out, None
    specs = [t.model_dump(exclude_none=True) for t in plan.tools]
    if native:
        return out, specs
    text = tools_system_text(plan.tools)
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out, None


# ---- streaming ---------------------------------------------------------------------------------------------------
class ToolStream:
    """One choice's chat deltas when tools are in play: content streams as far as it is surely content; calls are
    sent once complete (a named call streams its arguments as they are written)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.sent = 0  # characters of the text already sent (as content or as a named call's arguments)
        self.called = False

    def feed(self, text: str, finished: bool) -> list[dict]:
        """The deltas for the text so far (cumulative); ``finished``: this is the final text."""
        p = self.plan
        if p.mode == "named":
            out = []
            if not self.called:
                self.called = True
                out.append({"tool_calls": [{"index": 0, "id": new_call_id(), "type": "function",
                                            "function": {"name": p.named, "arguments": ""}}]})
            if len(text) > self.sent:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": text[self.sent:]}}]})
                self.sent = len(text)
            return out
        if not finished:
            safe = 0 if p.mode == "required" else p.parser.safe_prefix(text)
            return self._content(text, len(text[:safe].rstrip()))  # whitespace may precede a call: held
        content, calls = p.parse(text)
        if not calls:
            return self._content(text, len(text))
        self.called = True
        out = self._content(text, len(content)) if content else []
        for i, call in enumerate(calls):
            out.append({"tool_calls": [{"index": i, "id": new_call_id(), "type": "function",
                                        "function": {"name": call.name, "arguments": call.arguments}}]})
        return out

    def _content(self, text: str, upto: int) -> list[dict]:
        if upto <= self.sent:
            return []
        delta, self.sent = text[self.sent:upto], upto
        return [{"content": delta}]
