"""The router: which adapter (or the base) serves a request, from its text and the adapters' cards.

Rules first (keywords / regex → adapter); otherwise every card is scored against the request, and so is the base
as a class of its own (the shipped general card, ``calibration.general_card``). Each card's *lead* over the base is
compared with the card's threshold; the card furthest above its threshold wins if it leads the runner-up by
``margin``, else the base serves. The lead comes from one of two methods, by what the scorer gives:

- scorers that give vectors (USE, e5): the competing-class model (``classifier.py``), a softmax over the cards
  and the base fitted on the cards' and the general card's vectors; lead = the card's log-odds against the base,
  threshold 0 (it beats the base class), margin ``classifier.MARGIN``;
- the others (TF-IDF, MiniLM's blend): similarities (``calibration.py``), lead in units of the scorer's spread,
  each card's threshold fitted without labels, margin ``DEFAULT_MARGIN`` spreads.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.routing.calibration import (
    EXAMPLE_WEIGHT,
    GENERAL,
    NEGATIVE_QUANTILE,
    CardCalibration,
    Calibrator,
    card_score,
    example_score,
    general_card,
    quantile,
)
from loraplex.routing.cards import AdapterCard
from loraplex.routing.classifier import MARGIN as CLASSIFIER_MARGIN
from loraplex.routing.classifier import CompetingClasses
from loraplex.routing.rules import Rule, load_rules
from loraplex.routing.scorers import Scorer, lexical_tokens, make_scorer

DEFAULT_MARGIN = 0.1  # the similarity method's, in spreads; chosen on the development sets (tests/routing/*.json)
RECENT_DECISIONS = 50


@dataclass
class RouteDecision:
    """``adapter`` is ``None`` for the base. ``score`` is the chosen (or best) card's lead over the base minus its
    threshold, in the method's units (> 0 when it cleared it; 1.0 for a rule); ``candidates`` are every scored card
    with that value, best first."""

    adapter: str | None
    score: float
    candidates: list[tuple[str, float]] = field(default_factory=list)
    reason: str = ""

    def summary(self, k: int = 3) -> str:
        top = ", ".join(f"{n}={s:.3f}" for n, s in self.candidates[:k]) or "-"
        return f"{self.adapter or '(base)'} score={self.score:.3f} [{top}] {self.reason}"

    def to_dict(self, k: int = 5) -> dict:
        return {"adapter": self.adapter, "score": round(self.score, 4), "reason": self.reason,
                "candidates": [{"name": n, "score": round(s, 4)} for n, s in self.candidates[:k]]}


class Router:
    """``set_card`` / ``remove`` keep it in step with the registered adapters; ``route`` decides.

    An adapter registered with ``card=None`` can be the target of a rule but is never chosen by score.
    ``threshold`` (for every card, in the method's units: spreads, or log-odds) replaces the per-card one when
    given; ``margin`` is the lead over the runner-up in the same units (default: the method's). ``general``: the base's card (default: the shipped one). ``recent``: how many
    decisions ``recent_decisions`` keeps.
    """

    def __init__(self, scorer: Scorer | None = None, threshold: float | None = None, margin: float | None = None,
                 rules: list[Rule] | str | Path | None = None, example_weight: float = EXAMPLE_WEIGHT,
                 general: AdapterCard | None = None, recent: int = RECENT_DECISIONS) -> None:
        self.scorer = scorer if scorer is not None else make_scorer()
        self.threshold = threshold
        self.classify = self.scorer.vectorises
        self.margin = (CLASSIFIER_MARGIN if self.classify else DEFAULT_MARGIN) if margin is None else margin
        self.rules = load_rules(rules) if isinstance(rules, (str, Path)) else list(rules or [])
        self.example_weight = example_weight
        self._cards: dict[str, AdapterCard | None] = {}
        self._lock = threading.RLock()  # set_card / remove / calibration from several threads
        self._calibrator = Calibrator(self.scorer, example_weight)
        self._calibration: dict[str, CardCalibration] = {}
        self._stale: set[str] = set()
        self._model: CompetingClasses | None = None  # refitted when any card changes
        self._recent: deque[tuple[float, RouteDecision]] = deque(maxlen=max(1, recent))
        self.general = general or general_card()
        if len(self.general.examples) < 2:
            raise ValueError("general card: needs at least two examples (the base's class)")
        self.scorer.add(GENERAL, self.general.texts())
        self._general_words = {w for t in self.general.texts() for w in lexical_tokens(t)}
        self._words: dict[str, frozenset[str]] = {}  # each card's words that the general card does not use

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
        if name == GENERAL:
            raise ValueError(f"adapter name {GENERAL!r} is the router's name for the base model")
        with self._lock:
            if name in self._cards and self._cards[name] == card:
                return
            if card is None or card.empty:
                self.scorer.remove(name)
                self._words.pop(name, None)
                card = None
            else:
                self.scorer.add(name, card.texts())
                self._words[name] = frozenset(w for t in card.texts() for w in lexical_tokens(t)) - self._general_words
            self._cards[name] = card
            self._changed(name)

    def remove(self, name: str) -> None:
        with self._lock:
            self._cards.pop(name, None)
            self._words.pop(name, None)
            self.scorer.remove(name)
            self._changed(name)

    def _changed(self, name: str) -> None:
        self._calibration.pop(name, None)
        self._model = None
        if self.scorer.shared_statistics:  # every score moved: recalibrate everything, the spread too
            self._calibrator.invalidate()
            self._stale = set(self.cards)
        else:
            self._stale.add(name)

    def calibration(self) -> dict[str, CardCalibration]:
        """Each card's threshold, fitted now for cards that changed since the last call (with the classifier:
        threshold 0, and the model refitted on every card)."""
        with self._lock:
            if self.classify:
                return self._classifier_calibration()
            for name in self._stale & set(self.cards):
                self._calibration[name] = self._calibrator.card(name, self._cards[name])
            self._stale.clear()
            return {n: self._calibration[n] for n in self.cards}

    def _classifier_calibration(self) -> dict[str, CardCalibration]:
        model = self.model()
        if model is None:
            return {}
        if set(self._calibration) != set(model.names):  # summaries: the general prompts' and the examples' leads
            general = model.leads(self.scorer.card_vectors(GENERAL))  # [n, K]
            self._calibration = {
                n: CardCalibration(0.0, quantile(general[:, k].tolist(), NEGATIVE_QUANTILE),
                                   float(model.leads(self.scorer.card_vectors(n))[:, k].mean()))
                for k, n in enumerate(model.names)}
        return dict(self._calibration)

    def model(self) -> CompetingClasses | None:
        """The competing-class model over the current cards (``None`` without cards or vectors)."""
        with self._lock:
            if self._model is None and self.classify and self.cards:
                self._calibration = {}
                self._model = CompetingClasses.fit(self.scorer.card_vectors(GENERAL),
                                                   {n: self.scorer.card_vectors(n) for n in self.cards})
            return self._model

    def threshold_of(self, name: str) -> float:
        return self.threshold if self.threshold is not None else self.calibration()[name].threshold

    @property
    def spread(self) -> float:
        """The similarity method's unit (1.0 with the classifier: its leads are log-odds)."""
        if self.classify:
            return 1.0
        with self._lock:
            return self._calibrator.spread

    def route(self, prompt: str, system: str | None = None,
              allowed: Callable[[str], bool] | None = None) -> RouteDecision:
        """Route the request's text: the prompt (last user message) with the system prompt before it, among the
        adapters ``allowed(name)`` admits (all when None: a tenant's request routes among what it may use). The
        decision is kept in ``recent_decisions``."""
        decision = self._route(prompt, system, allowed)
        self._recent.append((time.time(), decision))
        return decision

    def describe(self, recent: int | None = None) -> dict:
        """What ``GET /v1/router`` shows: the scorer and why it was chosen, the spread, the margin, each card's
        threshold (and where it came from), the rules, and the last ``recent`` decisions, newest first."""
        calibration = self.calibration()
        cards = {}
        for name, card in self.cards.items():
            fitted = calibration[name].to_dict()
            if self.threshold is not None:
                fitted["threshold"] = self.threshold  # --router-threshold replaces the fitted one
            cards[name] = {**fitted, "examples": len(card.examples), "description": bool(card.description)}
        decisions = self.recent_decisions()[::-1][:recent]
        return {"scorer": {"name": self.scorer.name, "reason": self.scorer.reason, "fallback": self.scorer.fallback},
                "method": "classifier" if self.classify else "similarity", "spread": round(self.spread, 6), "margin": self.margin, "threshold": self.threshold,
                "general_examples": len(self.general.examples), "rules": len(self.rules), "cards": cards,
                "recent": [{"time": round(t, 3), **d.to_dict()} for t, d in decisions]}

    def recent_decisions(self) -> list[tuple[float, RouteDecision]]:
        """The last decisions (``recent`` of them), oldest first, with their wall-clock times."""
        return list(self._recent)

    def _own_words(self, text: str, names: list[str]) -> dict[str, int]:
        """For each card, how many of the text's words it alone uses: not the general card, no other card (a
        persona's name, a domain's term the base never sees)."""
        words = self._words
        out: dict[str, int] = {}
        for w in set(lexical_tokens(text)) - self._general_words:
            owners = [n for n in names if w in words.get(n, ())]
            if len(owners) == 1:
                out[owners[0]] = out.get(owners[0], 0) + 1
        return out

    def _route(self, prompt: str, system: str | None, allowed: Callable[[str], bool] | None) -> RouteDecision:
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
        names = [n for n in self.cards if allowed is None or allowed(n)]
        if not names:
            return RouteDecision(None, 0.0, [], "no adapter has a card")
        calibration = self.calibration() if self.threshold is None else {}
        leads = self._classifier_leads(text) if self.classify else self._similarity_leads(text, names)
        ranked = [(n, lead - (self.threshold if self.threshold is not None else calibration[n].threshold))
                  for n, lead in leads.items() if n in names and (n in calibration or self.threshold is not None)]
        ranked.sort(key=lambda x: -x[1])
        if not ranked:
            return RouteDecision(None, 0.0, [], "no adapter has a card")
        best, score = ranked[0]
        if score <= 0:  # NOTE: strictly above: a text sharing nothing with any card (lead 0) never routes
            return RouteDecision(None, score, ranked, f"base: best {best} is {-score:.3f} below its threshold")
        second = ranked[1] if len(ranked) > 1 else None
        if second is not None and score - second[1] < self.margin:
            return RouteDecision(None, score, ranked, f"base: best {best} leads {second[0]} by "
                                                      f"{score - second[1]:.3f} < margin {self.margin}")
        return RouteDecision(best, score, ranked, f"{best} is {score:.3f} above its threshold"
                                                  + (f", {score - second[1]:.3f} ahead of {second[0]}" if second
                                                     else ""))

    def _classifier_leads(self, text: str) -> dict[str, float]:
        model = self.model()
        if model is None:
            return {}
        return dict(zip(model.names, model.leads(self.scorer.query_vector(text))[0].tolist()))

    def _similarity_leads(self, text: str, names: list[str]) -> dict[str, float]:
        """Each card's lead over the base in spreads, plus the own-word bonus (``calibration.py``)."""
        spread = self.spread
        sims = self.scorer.similarities(text)
        base = example_score(sims[GENERAL].examples)
        own, bonus = self._own_words(text, names), self.scorer.own_word_bonus
        return {n: (card_score(sims[n], self.example_weight) - base) / spread + bonus * own.get(n, 0)
                for n in names if n in sims}  # a card registered meanwhile is not scored yet
