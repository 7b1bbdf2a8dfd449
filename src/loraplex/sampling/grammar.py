"""Constrained decoding with xgrammar: compile a :class:`StructuredOutputsParams` once (cached by its key, thread-safe,
so servers compile off the engine thread), give each sequence a matcher, mask a step's logits in one call.

Semantics: at every step a constrained row may only draw a token that keeps its text a prefix of a string of the
grammar (the stop tokens are allowed once the grammar is complete); the row finishes when its grammar terminates.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch

from loraplex.sampling_params import StructuredOutputsParams

COMPILE_CACHE_SIZE = 256  # compiled grammars kept (by schema), least recently used dropped first
LAX_STRING_CHAR, JSON_STRING_CHAR = r'[^\"\\\r\n]', r'[^\0-\x1f\"\\]'  # see GrammarCompiler._compile_json


def choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF whose strings are exactly ``choices`` (JSON string escapes are GBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Matcher:
    """One sequence's :class:`~loraplex.sampling_params.GrammarState`, over an xgrammar ``GrammarMatcher``."""

    __slots__ = ("_m",)

    def __init__(self, matcher) -> None:
        self._m = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return self._m.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()


class GrammarCompiler:
    """Compiles constraints for one tokenizer (its vocabulary padded to the model's ``vocab_size``)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_threads: int = 2) -> None:
        import xgrammar as xgr  # optional at import time: only constrained requests need it

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads)
        self.vocab_size = vocab_size
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar of ``spec``; ``ValueError`` naming the field when it is not a valid constraint."""
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                return hit
        compiled = self._compile(spec)
        with self._lock:
            self._cache[spec.key] = compiled
            while len(self._cache) > COMPILE_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputsParams):
        c, field = self._compiler, next(n for n in ("json", "regex", "choice", "grammar", "json_object")
                                        if getattr(spec, n) not in (None, False))
        try:
            if spec.json is not None:
                schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
                if not isinstance(schema, dict):
                    raise ValueError("a JSON schema is an object")
                return self._compile_json(json.dumps(schema), spec.any_whitespace)
            if spec.json_object:
                return self._compile_json('{"type": "object"}', spec.any_whitespace)
            if spec.regex is not None:
                return c.compile_regex(spec.regex)
            if spec.choice is not None:
                return c.compile_grammar(choice_grammar(spec.choice))
            return c.compile_grammar(spec.grammar)
        except (ValueError, RuntimeError, TypeError) as e:  # xgrammar reports bad input as these
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            first = re.sub(r"^\[[\d:]+\] \S+?:\d+: ", "", first)  # xgrammar's "[time] file.cc:line: " prefix
            raise ValueError(f"structured_outputs.{field}: cannot be compiled: {first}") from None

    def _compile_json(self, schema: str, any_whitespace: bool):
        """JSON schema → EBNF → compiled. The EBNF is mended first: xgrammar 0.2's length-bounded strings
        (``maxLength`` / ``minLength``) take ``[^"\\\r\n]``, which lets raw control characters into a JSON
        string (invalid JSON); they get JSON's own character class instead."""
        ebnf = str(self._xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace, strict_mode=True))
        return self._compiler.compile_grammar(ebnf.replace(LAX_STRING_CHAR, JSON_STRING_CHAR))

    def matcher(self, compiled) -> Matcher:
        return Matcher(self._xgr.GrammarMatcher(compiled))



def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """xgrammar's layout: ``int32 [rows, ceil(V / 32)]``, bit j of word w set = token 32·w + j allowed."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_grammar_masks(logits: torch.Tensor, grammars: list, bitmask: torch.Tensor,
                        greedy: list[bool] | None = None) -> None:
    """``logits: [S, V]``; ``grammars[i]``: row i's :class:`Matcher` or None. Rows with a grammar get ``-inf`` on
    every token their grammar forbids now (one C++ fill per row, one masking call for the step). A ``greedy`` row
    whose argmax is already allowed is left as it is: masking could not change its argmax (the common case inside a
    JSON string, where masking the whole vocabulary is most of the cost)."""
    import xgrammar as xgr

    rows = [i for i, g in enumerate(grammars) if g is not None]
    for i in rows:
        grammars[i].fill_bitmask(bitmask, i)
    if greedy is not None and (easy := [i for i in rows if greedy[i]]):
        top = logits[easy].argmax(dim=-1)
        allowed = ((bitmask[easy, top // 32] >> (top % 32)) & 1).tolist()
        skip = {i for i, ok in zip(easy, allowed) if ok}
        rows = [i for i in rows if i not in skip]
    if rows:
        xgr.apply_token_bitmask_inplace(logits, bitmask[:len(grammars)].to(logits.device), indices=rows,
                                        vocab_size=logits.shape[-1])


def apply_grammar_masks_reference(logits: torch.Tensor, grammars: list, bitmask: torch.Tensor) -> None:
    """Torch reference of :func:`apply_grammar_masks`: unpack the bits (bit j of word w allows token 32·w + j)."""
    for i, g in enumerate(grammars):
        if g is None:
            continue
        g.fill_bitmask(bitmask, i)
        words = bitmask[i].to(torch.int64) & 0xFFFFFFFF
        bits = (words.unsqueeze(1) >> torch.arange(32)).flatten()[:logits.shape[-1]] & 1
        logits[i].masked_fill_(bits == 0, float("-inf"))
