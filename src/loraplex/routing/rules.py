"""Routing rules from a JSON file: keywords or a regular expression → an adapter (``null``: the base model).

    {"rules": [{"adapter": "pirate", "keywords": ["ahoy", "matey"]},
               {"adapter": "congcong", "regex": "cong ?cong|聪聪"},
               {"adapter": null, "keywords": ["no adapter"]}]}

(a bare list of rules is accepted too). Matching is case-insensitive; an ASCII keyword matches whole words, any
other keyword (e.g. Chinese) anywhere. Rules are tried in file order and the first that matches wins over scores;
a rule naming an adapter the router does not know is skipped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Rule:
    adapter: str | None  # None: the base model
    pattern: re.Pattern
    source: str  # what the rule said, for decisions' reasons

    def match(self, text: str) -> str | None:
        """The matched text, or ``None``."""
        m = self.pattern.search(text)
        return m.group(0) if m else None


def _keyword(word: str) -> str:
    escaped = re.escape(word.strip())
    return rf"\b{escaped}\b" if word.isascii() and re.fullmatch(r"\w[\w\s'-]*\w|\w", word.strip()) else escaped


def make_rule(data: dict) -> Rule:
    """One rule from its JSON object: ``adapter`` plus ``keywords`` (list of strings) and/or ``regex``."""
    if not isinstance(data, dict) or "adapter" not in data:
        raise ValueError(f"a rule is an object with 'adapter' and 'keywords' or 'regex', got {data!r}")
    adapter = data["adapter"]
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise ValueError(f"rule adapter: a name or null (the base), got {adapter!r}")
    parts, source = [], []
    keywords = data.get("keywords") or []
    if isinstance(keywords, str) or not all(isinstance(k, str) and k.strip() for k in keywords):
        raise ValueError(f"rule keywords: a list of non-empty strings, got {keywords!r}")
    if keywords:
        parts += [_keyword(k) for k in keywords]
        source.append(f"keywords {list(keywords)}")
    if data.get("regex"):
        try:
            re.compile(data["regex"])
        except re.error as e:
            raise ValueError(f"rule regex {data['regex']!r}: {e}") from None
        parts.append(f"(?:{data['regex']})")
        source.append(f"regex {data['regex']!r}")
    if not parts:
        raise ValueError(f"rule for {adapter!r}: give 'keywords' or 'regex'")
    return Rule(adapter, re.compile("|".join(parts), re.IGNORECASE), " or ".join(source))


def load_rules(path: str | Path) -> list[Rule]:
    """The rules in a JSON file (raises ``ValueError`` naming the file when it is malformed)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        items = data.get("rules") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError("expected {\"rules\": [...]} or a list of rules")
        return [make_rule(item) for item in items]
    except (OSError, ValueError) as e:
        raise ValueError(f"router rules {path}: {e}") from None
