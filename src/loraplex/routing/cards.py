"""Adapter cards: what an adapter is for, in words (``description``) and by example (``examples``).

A card lives in the adapter's folder as ``adapter_card.json`` (``{"description": "…", "examples": ["…", …]}``) or
is given when the adapter is registered (``--lora-modules`` JSON form, ``/v1/load_lora_adapter``,
``LLM.set_adapter_card``). The router scores requests against cards; adapters without one are never chosen by score.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

CARD_FILE = "adapter_card.json"
log = logging.getLogger("loraplex.routing")


@dataclass(frozen=True)
class AdapterCard:
    """A description and example prompts; an empty card (neither) means "no card"."""

    description: str = ""
    examples: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.description, str):
            raise ValueError("description: must be a string")
        if isinstance(self.examples, str) or not all(isinstance(e, str) for e in self.examples):
            raise ValueError("examples: must be a list of strings")
        object.__setattr__(self, "description", self.description.strip())
        object.__setattr__(self, "examples", tuple(e.strip() for e in self.examples if e.strip()))

    @property
    def empty(self) -> bool:
        return not self.description and not self.examples

    @classmethod
    def of(cls, description: str | None, examples: list[str] | tuple[str, ...] | None) -> AdapterCard | None:
        """A card from optional fields; ``None`` when both are missing or empty."""
        card = cls(description or "", tuple(examples or ()))
        return None if card.empty else card

    @classmethod
    def from_dict(cls, data: dict) -> AdapterCard | None:
        if not isinstance(data, dict):
            raise ValueError("an adapter card must be a JSON object")
        examples = data.get("examples") or []
        if isinstance(examples, str):
            raise ValueError("examples: must be a list of strings")
        return cls.of(data.get("description"), list(examples))

    @classmethod
    def from_folder(cls, path: str | Path) -> AdapterCard | None:
        """The card in ``path/adapter_card.json``; ``None`` when the file is missing or malformed (logged as a
        warning naming the file and the error: the adapter then has no card)."""
        f = Path(path) / CARD_FILE
        if not f.is_file():
            return None
        try:
            return cls.from_dict(json.loads(f.read_text(encoding="utf-8")))
        except (ValueError, OSError) as e:
            log.warning("%s: ignored, not a valid adapter card: %s", f, e)
            return None

    def to_dict(self) -> dict:
        return {"description": self.description, "examples": list(self.examples)}

    def texts(self) -> list[str]:
        """What a scorer indexes: the description first (``""`` when there is none), then each example."""
        return [self.description, *self.examples]


class CardBook:
    """Each adapter's card, by one rule for the server and ``LLM``: a card given for the name wins (``None`` given =
    no card at all), else ``adapter_card.json`` in the adapter's folder (re-read only when the file changes)."""

    def __init__(self) -> None:
        self._given: dict[str, AdapterCard | None] = {}
        self._folders: dict[str, tuple[float | None, AdapterCard | None]] = {}  # path -> (mtime, card)

    def give(self, name: str, card: AdapterCard | None) -> None:
        self._given[name] = card

    def forget(self, name: str) -> None:
        """Back to the folder's card."""
        self._given.pop(name, None)

    def card(self, name: str, path: str | None) -> AdapterCard | None:
        if name in self._given:
            return self._given[name]
        if path is None:
            return None
        f = Path(path) / CARD_FILE
        try:
            mtime = f.stat().st_mtime
        except OSError:
            mtime = None
        cached = self._folders.get(path)
        if cached is None or cached[0] != mtime:
            cached = self._folders[path] = (mtime, AdapterCard.from_folder(path) if mtime is not None else None)
        return cached[1]
