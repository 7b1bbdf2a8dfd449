"""What the scheduler asks of the adapter store: may a step hold these adapters, and hold / release them.

The scheduler decides which requests run; the store alone owns which adapters are held (by running requests),
pinned and resident in device slots. Nothing is shared between the two but these calls.
"""
from __future__ import annotations

from collections.abc import Set
from typing import Protocol


class AdapterUnreadable(ValueError):
    """An adapter's weights could not be read (files gone or damaged since it was registered): its own requests
    fail, nothing else does."""


class AdapterResidency(Protocol):
    def can_hold(self, names: Set[str]) -> bool:
        """Could a step hold ``names`` beside the adapters already held and the pinned ones (they all need device
        slots at once, at most ``max_loras``)?"""

    def hold(self, names: Set[str]) -> None:
        """A request using ``names`` starts running: read them into host memory now (raise
        :class:`AdapterUnreadable` and hold nothing when one cannot be read); held adapters are never evicted."""

    def release(self, names: Set[str]) -> None:
        """A request using ``names`` stopped running (finished, aborted or preempted)."""


class NoAdapters:
    """The residency of an engine without LoRA: only base requests exist."""

    def can_hold(self, names: Set[str]) -> bool:
        return not names

    def hold(self, names: Set[str]) -> None:
        if names:
            raise AdapterUnreadable(f"lora_request: this engine serves no adapters ({sorted(names)[0]!r})")

    def release(self, names: Set[str]) -> None:
        pass
