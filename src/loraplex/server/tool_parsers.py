"""Tool-call parsers: find the calls a model wrote in its own format (``tool_choice: "auto"``), by vLLM's
``--tool-call-parser`` names. Each parser says how much of a growing text is surely content (safe to stream) and
splits a final text into (content, calls); the content is always a prefix of the text (right-stripped)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


def _call(obj, args_keys=("arguments", "parameters")) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _before_marker(text: str, marker: str) -> int:
    """How much of ``text`` is surely content: up to ``marker``, or all but a tail that could still grow into it."""
    i = text.find(marker)
    if i != -1:
        return i
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return len(text)


def _content_before(text: str, i: int) -> str | None:
    """The content a model wrote before its calls (which start at ``i``), right-stripped; None when blank."""
    return text[:i].rstrip() or None


class HermesParser:
    """``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` blocks (Hermes, Qwen2.5/3, SmolLM3; and the format
    loraplex itself describes to a model whose chat template knows no tools)."""

    name = "hermes"
    open, close = "<tool_call>", "</tool_call>"
    skip_special_tokens = True

    def safe_prefix(self, text: str) -> int:
        return _before_marker(text, self.open)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        i = text.find(self.open)
        if i == -1:
            return text, []
        calls = []
        for block in text[i:].split(self.open)[1:]:
            body = block.split(self.close)[0].strip()  # an unclosed last block (EOS came first) still counts
            try:
                call = _call(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []  # not well formed: the text is content, as written
            calls.append(call)
        return _content_before(text, i), calls


class Llama3JsonParser:
    """Llama 3.x JSON tool calls: the answer *is* ``{"name": …, "parameters": {…}}`` (optionally after
    ``<|python_tag|>``, several joined by ``;``)."""

    name = "llama3_json"
    tag = "<|python_tag|>"
    skip_special_tokens = True

    def safe_prefix(self, text: str) -> int:
        head = text.lstrip()
        if not head or head[0] == "{" or head.startswith(self.tag) or self.tag.startswith(head):
            return 0  # could be a call: hold it until the end
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix(self.tag).strip()
        if not body.startswith("{"):
            return text, []
        calls, dec, pos = [], json.JSONDecoder(), 0
        while pos < len(body):
            try:
                obj, end = dec.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            call = _call(obj)
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \n\t;":
                pos += 1
        return None, calls


class MistralParser:
    """Mistral: ``[TOOL_CALLS] [{"name": …, "arguments": {…}}, …]`` (the marker is a special token, so the text is
    detokenized with special tokens kept)."""

    name = "mistral"
    marker = "[TOOL_CALLS]"
    skip_special_tokens = False

    def safe_prefix(self, text: str) -> int:
        return _before_marker(text, self.marker)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        i = text.find(self.marker)
        if i == -1:
            return text, []
        body = re.sub(r"</s>\s*$", "", text[i + len(self.marker):]).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        calls = [_call(o) for o in (obj if isinstance(obj, list) else [obj])]
        if not calls or None in calls:
            return text, []
        return _content_before(text, i), calls


PARSERS = {p.name: p for p in (HermesParser(), Llama3JsonParser(), MistralParser())}


def parser_for(chat_template: str | None, configured: str | None = None):
    """``--tool-call-parser`` when given; else the format the chat template itself writes (Hermes by default, which
    is also what loraplex describes to a model whose template knows no tools)."""
    if configured is not None:
        return PARSERS[configured]
    tpl = chat_template or ""
    if "[TOOL_CALLS]" in tpl:
        return PARSERS["mistral"]
    if "<|python_tag|>" in tpl or "ipython" in tpl:
        return PARSERS["llama3_json"]
    return PARSERS["hermes"]
