"""The competing-class model (``routing/classifier.py``) on synthetic vectors, and the router using it."""
from __future__ import annotations

import numpy as np

from loraplex.routing import AdapterCard, Router
from loraplex.routing.classifier import CompetingClasses
from loraplex.routing.scorers import Scorer


def _clusters(seed: int = 0):
    """General prompts spread around a common direction; each card a tight cluster off it in its own direction."""
    rng = np.random.default_rng(seed)
    dim = 32
    common = np.zeros(dim)
    common[0] = 3.0
    general = common + rng.normal(size=(200, dim))
    cards = {f"c{k}": common + 2.5 * np.eye(dim)[k + 1] + 0.3 * rng.normal(size=(4, dim)) for k in range(3)}
    return rng, common, general, cards


def test_cards_beat_the_base_only_in_their_own_direction():
    rng, common, general, cards = _clusters()
    model = CompetingClasses.fit(general, cards)
    assert model.names == ("c0", "c1", "c2")
    dim = general.shape[1]
    unseen = np.stack([common + 2.5 * np.eye(dim)[k + 1] + 0.3 * rng.normal(size=dim) for k in range(3)])
    leads = model.leads(unseen)  # [3, 3]
    assert leads.shape == (3, 3)
    assert (leads.argmax(1) == [0, 1, 2]).all() and (leads.max(1) > 0).all()
    fresh_general = common + rng.normal(size=(100, dim))
    assert (model.leads(fresh_general).max(1) <= 0).mean() >= 0.9  # most unseen general vectors stay on the base


class VectorScorer(Scorer):
    """Cards' vectors given by hand; a query is a key into ``queries``."""

    name = "vectors"
    vectorises = True

    def __init__(self, vectors: dict[str, np.ndarray], queries: dict[str, np.ndarray]) -> None:
        self.vectors, self.queries, self.fits = vectors, queries, 0

    def add(self, name, texts):
        self.fits += name != "(base)"

    def remove(self, name):
        pass

    def card_vectors(self, name):
        return self.vectors[name]

    def query_vector(self, query):
        return self.queries[query]


def test_router_uses_the_classifier_and_refits_when_cards_change():
    rng, common, general, cards = _clusters(1)
    dim = general.shape[1]
    queries = {"near c1": common + 2.5 * np.eye(dim)[2], "general": common + 0.1 * rng.normal(size=dim)}
    scorer = VectorScorer({"(base)": general, **cards}, queries)
    general_card = AdapterCard("", tuple(f"g{i}" for i in range(len(general))))
    r = Router(scorer, general=general_card)
    assert r.margin == 0.0 and r.spread == 1.0
    for name in cards:
        r.set_card(name, AdapterCard("", ("a", "b", "c", "d")))
    d = r.route("near c1")
    assert d.adapter == "c1" and d.candidates[0][0] == "c1" and "above its threshold" in d.reason
    assert r.route("general").adapter is None
    assert set(r.calibration()) == set(cards) and all(c.threshold == 0.0 for c in r.calibration().values())
    assert r.describe()["method"] == "classifier"
    first = r.model()
    r.remove("c1")
    assert r.model() is not first and r.model().names == ("c0", "c2")
    assert r.route("near c1").adapter != "c1"
    r.threshold = d.score + 100.0  # one fixed threshold (log-odds) above any lead: nothing routes
    assert r.route("near c1").adapter is None
