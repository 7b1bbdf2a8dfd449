"""Adapter cards: what an adapter is for, in words (``description``) and by example (``examples``).

A card lives in the adapter's folder as ``adapter_card.json`` (``{"description": "…", "examples": ["…", …]}``) or
is given when the adapter is registered (``--lora-modules`` JSON form, ``/v1/load_lora_adapter``,
``LLM.set_adapter_card``). The router scores requests against cards; adapters without one are never chosen by score.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CARD_FILE = "adapter_card.json"


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
        """The card in ``path/adapter_card.json``; ``None`` when the file is missing or malformed."""
        f = Path(path) / CARD_FILE
        if not f.is_file():
            return None
        try:
            return cls.from_dict(json.loads(f.read_text(encoding="utf-8")))
        except (ValueError, OSError):
            return None

    def to_dict(self) -> dict:
        return {"description": self.description, "examples": list(self.examples)}

    def texts(self) -> list[str]:
        """What a scorer indexes: the description first (``""`` when there is none), then each example."""
        return [self.description, *self.examples]
