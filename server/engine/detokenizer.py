"""Incremental detokenization, safe for streaming.

Text is handed out only once it is final: never a partial multi-byte character (U+FFFD), and
never the last `holdback` characters, which may turn out to be the start of a stop string
(the output processor's StopRules decide where a stop string cuts the text).
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, holdback: int = 0) -> None:
        self.tokenizer, self.holdback = tokenizer, holdback
        self.ids: list[int] = []
        self.text = ""  # decoded output so far (possibly ahead of what was handed out)
        self.emitted = 0  # characters of self.text already handed out
        self.new_from = 0  # where the text the latest token completed starts
        self._prefix_offset = self._read_offset = 0

    def add(self, token: int) -> None:
        """Append a token and decode what it completes."""
        self.ids.append(token)
        self.new_from = len(self.text)
        self.text += self._decode_delta()

    def take(self) -> str:
        """The newly final text (may be empty): all but the last `holdback` characters."""
        return self._take(len(self.text) - self.holdback)

    def flush(self) -> str:
        """All remaining text (the sequence finished)."""
        self.text += self._decode_tail()
        return self._take(len(self.text))

    def cut(self, end: int) -> str:
        """The sequence stopped at text[:end] (a stop string): the rest of the text up to there."""
        self.text = self.text[:end]
        return self._take(end)

    def _decode_delta(self) -> str:
        """vLLM-style: decode a short window and keep only complete characters."""
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def _decode_tail(self) -> str:
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return full[len(prefix) :]

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        chunk = self.text[self.emitted : upto]
        self.emitted = upto
        return chunk
