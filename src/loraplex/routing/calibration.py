"""The base as a competing class, and per-card thresholds fitted without labels.

Scores (every class alike):

    example_score(sims) = 0.75 · max(sims) + 0.25 · mean(top-2 sims)
    card_score(q, c)    = 0.5 · example_score(q vs c's examples) + 0.5 · sim(q, c's description)   (one alone if
                          the card lacks the other)
    lead(q, c)          = (card_score(q, c) − example_score(q vs the general card)) / spread

``spread`` is the standard deviation of the similarities between the general card's prompts: how far apart this
scorer puts unrelated prompts (e5's cosines live in 0.7–0.9, MiniLM's in −0.1–0.9, TF-IDF's mostly near 0), so
thresholds and margins are in units of it, not in raw cosine.

A card's threshold comes from two samples the router already has, no labels: its *positives*, the lead of each of
its examples over the base when that example is left out of the card (leave-one-out: what an unseen prompt of the
domain scores), and its *negatives*, the lead of each general prompt when that prompt is left out of the general
card. ``threshold = N + POSITIVE_SHARE · (P − N)`` where ``N`` is the ``NEGATIVE_QUANTILE`` of the negatives and
``P`` the mean of the positives — closer to the negatives, since a leave-one-out example is scored against one
example fewer than a real prompt. When the positives do not clear ``N`` the card keeps ``N`` (it routes only what
beats every usual general prompt). Recomputed whenever a card changes (every card, for scorers whose statistics
are shared: TF-IDF's document frequencies).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from loraplex.routing.cards import AdapterCard
from loraplex.routing.scorers import CardSims, Scorer

GENERAL = "(base)"  # the general card's name among a scorer's cards
GENERAL_FILE = Path(__file__).with_name("data") / "general_card.json"
EXAMPLE_WEIGHT = 0.5
NEGATIVE_QUANTILE = 0.95
POSITIVE_SHARE = 0.3


@lru_cache(maxsize=1)
def general_card() -> AdapterCard:
    """The shipped general card (``data/general_card.json``): a few hundred varied prompts, English and Chinese."""
    data = json.loads(GENERAL_FILE.read_text(encoding="utf-8"))
    return AdapterCard(data.get("description", ""), tuple(data["examples"]))


def example_score(sims: Sequence[float]) -> float:
    """``0.75 · best + 0.25 · mean(top-2)``; 0 without examples."""
    if not sims:
        return 0.0
    top = sorted(sims, reverse=True)[:2]
    return 0.75 * top[0] + 0.25 * sum(top) / len(top)


def card_score(sims: CardSims, example_weight: float = EXAMPLE_WEIGHT) -> float:
    if not sims.examples:
        return sims.description or 0.0
    best = example_score(sims.examples)
    if sims.description is None:
        return best
    return example_weight * best + (1 - example_weight) * sims.description


def quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


@dataclass(frozen=True)
class CardCalibration:
    """A card's threshold on ``lead`` and the samples it came from (summaries, for ``GET /v1/router``)."""

    threshold: float
    negative: float  # N: the NEGATIVE_QUANTILE of the general prompts' leads
    positive: float | None  # P: the mean leave-one-out lead of its examples (None: no example can be left out)

    def to_dict(self) -> dict:
        r = lambda x: None if x is None else round(x, 4)  # noqa: E731
        return {"threshold": r(self.threshold), "general_quantile": r(self.negative), "examples_mean": r(self.positive)}


class Calibrator:
    """Fits ``spread`` and each card's threshold from the scorer's ``cross`` similarities (module docstring)."""

    def __init__(self, scorer: Scorer, example_weight: float = EXAMPLE_WEIGHT) -> None:
        self.scorer = scorer
        self.example_weight = example_weight
        self._general: tuple[float, list[float]] | None = None  # (spread, each general prompt's leave-one-out score)

    def invalidate(self) -> None:
        self._general = None

    def general(self) -> tuple[float, list[float]]:
        """``(spread, general score of each general prompt with itself left out)``."""
        if self._general is None:
            gg = self.scorer.cross(GENERAL, GENERAL)
            n = len(gg) - 1
            off = [gg[i][j] for i in range(1, n + 1) for j in range(1, n + 1) if i != j]
            mean = sum(off) / len(off)
            spread = math.sqrt(sum((x - mean) ** 2 for x in off) / len(off)) or 1.0
            loo = [example_score(gg[i][1:i] + gg[i][i + 1:]) for i in range(1, n + 1)]
            self._general = (spread, loo)
        return self._general

    @property
    def spread(self) -> float:
        return self.general()[0]

    def card(self, name: str, card: AdapterCard) -> CardCalibration:
        spread, general_loo = self.general()
        has_desc = bool(card.description)
        gc = self.scorer.cross(GENERAL, name)  # each general prompt vs the card's texts
        negatives = [(card_score(CardSims(row[0] if has_desc else None, tuple(row[1:])), self.example_weight) - g)
                     / spread for row, g in zip(gc[1:], general_loo)]
        positives = []
        if len(card.examples) > 1 or (card.examples and has_desc):
            cc, cg = self.scorer.cross(name, name), self.scorer.cross(name, GENERAL)
            for i in range(1, len(cc)):
                rest = tuple(cc[i][1:i] + cc[i][i + 1:])
                own = card_score(CardSims(cc[i][0] if has_desc else None, rest), self.example_weight)
                positives.append((own - example_score(cg[i][1:])) / spread)
        n = quantile(negatives, NEGATIVE_QUANTILE)
        p = sum(positives) / len(positives) if positives else None
        threshold = n + POSITIVE_SHARE * (p - n) if p is not None and p > n else n
        return CardCalibration(threshold, n, p)
