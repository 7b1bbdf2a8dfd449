"""Routing accuracy per scorer: the development sets (where defaults were chosen) and the three held-out sets (never
used to choose anything; ``tests/routing/heldout``, ``heldout2`` — written before the competing-class method — and
``heldout3``, written blind before it was first measured). The floors are the measured figures (docs/benchmarks.md, "Router v2") less a small allowance, so a change
that routes worse fails here.

The issue's targets — held-out English ≥ 0.95, Chinese ≥ 0.90, general prompts kept on the base ≥ 0.98 with the
embedding scorer, ≥ 0.85 with TF-IDF — are met only for the general prompts of the first two sets (USE: 1.000 on
both, 0.969 on heldout3; English 0.863 / 0.800 / 0.812, Chinese 0.850 / 0.787 / 0.812); the floors below are what
the router does today.
"""
from __future__ import annotations

import json

import pytest

from loraplex.routing import ENCODERS, general_card, make_scorer
from tests.routing.evalset import (
    HELDOUT_SETS,
    cards_router,
    demo_router,
    dev_domains,
    evaluate,
    heldout,
    heldout_figures,
    heldout_general,
    load_eval,
)

# measured (docs/benchmarks.md) - 0.03, rounded down: dev (eval_set.json), dev_domains, then per held-out set en /
# zh / general
FLOORS = {
    "use": {"dev": 0.93, "dev_domains": 0.91,
            "heldout": {"en": 0.83, "zh": 0.82, "general": 0.97},
            "heldout2": {"en": 0.77, "zh": 0.75, "general": 0.97},
            "heldout3": {"en": 0.78, "zh": 0.78, "general": 0.93}},
    "e5": {"dev": 0.93, "dev_domains": 0.89,
            "heldout": {"en": 0.82, "zh": 0.83, "general": 0.97},
            "heldout2": {"en": 0.70, "zh": 0.85, "general": 0.97},
            "heldout3": {"en": 0.87, "zh": 0.83, "general": 0.94}},
    "minilm": {"dev": 0.91, "dev_domains": 0.80,
            "heldout": {"en": 0.82, "zh": 0.58, "general": 0.94},
            "heldout2": {"en": 0.74, "zh": 0.72, "general": 0.97},
            "heldout3": {"en": 0.85, "zh": 0.60, "general": 0.91}},
    "lexical": {"dev": 0.89, "dev_domains": 0.70,
            "heldout": {"en": 0.58, "zh": 0.59, "general": 0.92},
            "heldout2": {"en": 0.33, "zh": 0.63, "general": 0.96},
            "heldout3": {"en": 0.24, "zh": 0.59, "general": 0.92}},
}


def scorer_param(name: str):
    marks = () if name == "lexical" or ENCODERS[name].installed() else pytest.mark.skip(
        reason=f"{ENCODERS[name].package} not installed")
    return pytest.param(name, marks=marks)


SCORERS = [scorer_param(n) for n in FLOORS]


def test_sets_are_disjoint_and_sized():
    """Per held-out set: 8 domains x 10 prompts per language, cards of a description and 3 examples, >= 40 general
    prompts; no evaluation prompt is a card example, in the shipped general card or in another set, and no domain
    is in two sets."""
    texts, domains = set(), set()
    for root in HELDOUT_SETS.values():
        for lang in ("en", "zh"):
            cards, items = heldout(lang, root)
            assert len(cards) >= 8 and all(len(c.examples) == 3 and c.description for c in cards.values())
            assert all(sum(it.label == d for it in items) == 10 for d in cards)
            examples = {e for c in cards.values() for e in c.examples}
            assert not examples & {it.prompt for it in items}
            assert not domains & set(cards) and not texts & {it.prompt for it in items}
            domains |= set(cards)
            texts |= {it.prompt for it in items}
        general = {it.prompt for it in heldout_general(root)}
        assert len(general) >= 40 and sum(any("\u4e00" <= ch <= "\u9fff" for ch in p) for p in general) >= 20
        assert not texts & general
        texts |= general
        assert json.loads((root / "general.json").read_text(encoding="utf-8"))["_comment"]
    dev_cards, dev_items = dev_domains()
    dev_texts = {it.prompt for it in dev_items} | {it.prompt for it in load_eval()}
    assert not domains & set(dev_cards)
    # NOTE: heldout/general.json shares "What is the capital of Japan?" with a development set; heldout2 shares none
    assert texts & dev_texts == {"What is the capital of Japan?"}
    texts |= dev_texts
    shipped = set(general_card().examples)
    assert len(shipped) >= 200 and not shipped & texts


@pytest.mark.parametrize("kind", SCORERS)
def test_development_sets(kind):
    scorer = make_scorer(kind)
    acc, report = evaluate(demo_router(scorer), load_eval())
    cards, items = dev_domains()
    acc2, report2 = evaluate(cards_router(scorer, cards), items)
    print(f"\n{report}\n{report2}")
    assert acc >= FLOORS[kind]["dev"], report
    assert acc2 >= FLOORS[kind]["dev_domains"], report2


@pytest.mark.parametrize("kind", SCORERS)
@pytest.mark.parametrize("held", list(HELDOUT_SETS))
def test_heldout_sets(kind, held):
    figures, report = heldout_figures(make_scorer(kind), HELDOUT_SETS[held])
    print(f"\n{kind} {held}: {figures}\n{report}")
    for key, floor in FLOORS[kind][held].items():
        assert figures[key] >= floor, f"{kind} {held} {key}: {figures[key]:.3f} < {floor}\n{report}"
