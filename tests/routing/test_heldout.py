"""Routing accuracy per scorer: the development sets (where defaults were chosen) and the held-out sets (never
used to choose anything; ``tests/routing/heldout``). The floors are the measured figures (docs/benchmarks.md,
"Router accuracy") less a small allowance, so a change that routes worse fails here.

The issue's targets — held-out English ≥ 0.95, Chinese ≥ 0.90, general prompts kept on the base ≥ 0.98 with the
embedding scorer, ≥ 0.85 with TF-IDF — are met only for Chinese with the default scorer (USE: 0.900 English,
0.925 Chinese, 0.896 general); the floors below are what the router does today.
"""
from __future__ import annotations

import json

import pytest

from loraplex.routing import ENCODERS, general_card, make_scorer
from tests.routing.evalset import (
    HELDOUT,
    cards_router,
    demo_router,
    dev_domains,
    evaluate,
    heldout,
    heldout_figures,
    heldout_general,
    load_eval,
)

# measured (docs/benchmarks.md) - 0.03, rounded down: dev (eval_set.json), dev_domains, held-out en / zh / general
FLOORS = {
    "use": {"dev": 0.88, "dev_domains": 0.90, "en": 0.87, "zh": 0.89, "general": 0.86},
    "e5": {"dev": 0.93, "dev_domains": 0.85, "en": 0.78, "zh": 0.83, "general": 0.88},
    "minilm": {"dev": 0.91, "dev_domains": 0.80, "en": 0.82, "zh": 0.58, "general": 0.94},
    "lexical": {"dev": 0.89, "dev_domains": 0.70, "en": 0.58, "zh": 0.59, "general": 0.92},
}


def scorer_param(name: str):
    marks = () if name == "lexical" or ENCODERS[name].installed() else pytest.mark.skip(
        reason=f"{ENCODERS[name].package} not installed")
    return pytest.param(name, marks=marks)


SCORERS = [scorer_param(n) for n in FLOORS]


def test_sets_are_disjoint_and_sized():
    """8 domains x 10 prompts per language, cards of a description and 3 examples, >= 40 general prompts; no
    evaluation prompt is a card example or in the shipped general card."""
    texts = set()
    for lang in ("en", "zh"):
        cards, items = heldout(lang)
        assert len(cards) >= 8 and all(len(c.examples) == 3 and c.description for c in cards.values())
        assert all(sum(it.label == d for it in items) == 10 for d in cards)
        examples = {e for c in cards.values() for e in c.examples}
        assert not examples & {it.prompt for it in items}
        texts |= {it.prompt for it in items}
    general = heldout_general()
    assert len(general) >= 40 and sum(any("\u4e00" <= ch <= "\u9fff" for ch in it.prompt) for it in general) >= 20
    dev_cards, dev_items = dev_domains()
    texts |= {it.prompt for it in general} | {it.prompt for it in dev_items} | {it.prompt for it in load_eval()}
    shipped = set(general_card().examples)
    assert len(shipped) >= 200 and not shipped & texts
    assert json.loads((HELDOUT / "general.json").read_text(encoding="utf-8"))["_comment"]


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
def test_heldout_sets(kind):
    figures, report = heldout_figures(make_scorer(kind))
    print(f"\n{kind}: {figures}\n{report}")
    for key, floor in FLOORS[kind].items():
        if key in figures:
            assert figures[key] >= floor, f"{kind} held-out {key}: {figures[key]:.3f} < {floor}\n{report}"
