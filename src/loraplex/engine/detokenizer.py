"""Incremental detokenization that never splits a multi-byte UTF-8 character.

A window of recent ids is decoded twice (with and without the newest tokens); the text in between is released
only when it does not end in U+FFFD, i.e. when the newest bytes form whole characters. A few prompt tokens seed
the window so tokenizers that drop a leading space at the start of a text decode the first token right.
"""
from __future__ import annotations

CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Feed token ids one at a time with :meth:`step`; get text deltas back."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever is held back (an incomplete character becomes U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):] if len(text) > len(prefix) else ""
