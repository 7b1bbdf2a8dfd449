"""Incremental detokenization never splits a UTF-8 character and reproduces the full decode."""
from __future__ import annotations

from loraplex.engine.detokenizer import IncrementalDetokenizer
from tests.conftest import byte_tokenizer


def test_streamed_chinese_text_is_intact():
    tok = byte_tokenizer()
    text = "聪聪说:你好,世界!🌟 ok"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # one token per byte: every character spans several steps
    detok = IncrementalDetokenizer(tok, tok.encode("prompt: "))
    deltas = [detok.step(t) for t in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_flush_releases_incomplete_tail():
    tok = byte_tokenizer()
    ids = tok.encode("好")[:2]  # a truncated 3-byte character
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.step(t) for t in ids] == ["", ""]
    assert detok.flush() == "\ufffd"
