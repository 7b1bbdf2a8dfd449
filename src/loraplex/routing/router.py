"""The router: which adapter (or the base) serves a request, from its text and the adapters' cards.

Rules first (keywords / regex → adapter); otherwise every card is scored — ``example_weight`` × the best example
similarity + the rest × the description similarity (one of them alone when the card lacks the other) — and the
best card wins if its score reaches ``threshold`` and leads the runner-up by ``margin``; else the base serves.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.routing.cards import AdapterCard
from loraplex.routing.rules import Rule, load_rules
from loraplex.routing.scorers import CardSims, Scorer, make_scorer

EXAMPLE_WEIGHT = 0.7


@dataclass
class RouteDecision:
    """``adapter`` is ``None`` for the base; ``candidates`` are every scored card, best first."""

    adapter: str | None
    score: float
    candidates: list[tuple[str, float]] = field(default_factory=list)
    reason: str = ""

    def summary(self, k: int = 3) -> str:
        top = ", ".join(f"{n}={s:.3f}" for n, s in self.candidates[:k]) or "-"
        return f"{self.adapter or '(base)'} score={self.score:.3f} [{top}] {self.reason}"


def card_score(sims: CardSims, example_weight: float = EXAMPLE_WEIGHT) -> float:
    best = max(sims.examples) if sims.examples else None
    if best is None:
        return sims.description or 0.0
    if sims.description is None:
        return best
    return example_weight * best + (1 - example_weight) * sims.description


class Router:
    """``set_card`` / ``remove`` keep it in step with the registered adapters; ``route`` decides.

    An adapter registered with ``card=None`` can be the target of a rule but is never chosen by score.
    ``threshold`` and ``margin`` default to the scorer's (their scales differ).
    """

    def __init__(self, scorer: Scorer | None = None, threshold: float | None = None, margin: float | None = None,
                 rules: list[Rule] | str | Path | None = None, example_weight: float = EXAMPLE_WEIGHT) -> None:
        self.scorer = scorer if scorer is not None else make_scorer()
        self.threshold = self.scorer.default_threshold if threshold is None else threshold
        self.margin = self.scorer.default_margin if margin is None else margin
        self.rules = load_rules(rules) if isinstance(rules, (str, Path)) else list(rules or [])
        self.example_weight = example_weight
        self._cards: dict[str, AdapterCard | None] = {}
        self._lock = threading.Lock()  # set_card / remove from several threads

    @property
    def blocking(self) -> bool:
        """Whether ``route`` is heavy enough to keep off an event loop thread."""
        return self.scorer.blocking

    @property
    def cards(self) -> dict[str, AdapterCard]:
        return {n: c for n, c in self._cards.items() if c is not None}

    @property
    def names(self) -> set[str]:
        return set(self._cards)

    def set_card(self, name: str, card: AdapterCard | None) -> None:
        """Register ``name`` with its card (embedded now, cached until replaced), or without one."""
        with self._lock:
            if name in self._cards and self._cards[name] == card:
                return
            if card is None or card.empty:
                self.scorer.remove(name)
                card = None
            else:
                self.scorer.add(name, card.texts())
            self._cards[name] = card

    def remove(self, name: str) -> None:
        with self._lock:
            self._cards.pop(name, None)
            self.scorer.remove(name)

    def route(self, prompt: str, system: str | None = None,
              allowed: Callable[[str], bool] | None = None) -> RouteDecision:
        """Route the request's text: the prompt (last user message) with the system prompt before it, among the
        adapters ``allowed(name)`` admits (all when None: a tenant's request routes among what it may use)."""
        text = f"{system.strip()}\n{prompt}" if system and system.strip() else prompt
        for rule in self.rules:
            if rule.adapter is not None and (rule.adapter not in self._cards
                                             or (allowed is not None and not allowed(rule.adapter))):
                continue
            hit = rule.match(text)
            if hit is not None:
                return RouteDecision(rule.adapter, 1.0, [], f"rule {rule.source} matched {hit!r}")
        if not text.strip():
            return RouteDecision(None, 0.0, [], "empty prompt")
        sims = self.scorer.similarities(text)
        ranked = sorted(((n, card_score(s, self.example_weight)) for n, s in sims.items() if n in self._cards
                         and (allowed is None or allowed(n))),
                        key=lambda x: -x[1])
        if not ranked:
            return RouteDecision(None, 0.0, [], "no adapter has a card")
        best, score = ranked[0]
        second = ranked[1][1] if len(ranked) > 1 else 0.0
        if score < self.threshold:
            return RouteDecision(None, score, ranked, f"best {best} {score:.3f} < threshold {self.threshold}")
        if score - second < self.margin:
            return RouteDecision(None, score, ranked,
                                 f"best {best} leads {ranked[1][0]} by {score - second:.3f} < margin {self.margin}")
        return RouteDecision(best, score, ranked, f"score {score:.3f} >= {self.threshold}, "
                                                  f"lead {score - second:.3f} >= {self.margin}")
