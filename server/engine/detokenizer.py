"""Incremental detokenization with stop strings, safe for streaming.

Text is emitted only once it is final: never a partial multi-byte character (U+FFFD) and never
the start of what may turn out to be a stop string.
"""

from __future__ import annotations

from server.engine.sampling import SamplingParams
from server.model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.ids: list[int] = []
        self.text = ""  # decoded output so far (possibly ahead of what was emitted)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False
        self._prefix_offset = self._read_offset = 0
        self._holdback = max((len(s) - 1 for s in params.stop), default=0)

    def add(self, token: int, check_stop: bool = True) -> str:
        """Append a token; return the newly final text (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = len(self.text)
        self.text += self._decode_delta()
        if check_stop and self.params.stop and self._truncate_at_stop(before):
            return ""  # flush() hands out the rest up to the stop string
        return self._take(len(self.text) - self._holdback)

    def flush(self) -> str:
        """All remaining text (the sequence finished)."""
        if not self.stopped:
            self.text += self._decode_tail()
        return self._take(len(self.text))

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

    def _truncate_at_stop(self, before: int) -> bool:
        """Stop strings that end in this token's text (as vLLM: a stop completed while stops
        were not checked, under min_tokens, is ignored). Such a stop starts at least
        len(stop) - 1 characters before `before`, and the holdback kept those unsent, so the cut
        never falls into text the client already has."""
        hits = [
            (i, s) for s in self.params.stop
            if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0
        ]
        if not hits:
            return False
        index, stop = min(hits)
        keep = index + len(stop) if self.params.include_stop_str_in_output else index
        self.text, self.stopped = self.text[:keep], True
        return True

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        chunk = self.text[self.emitted : upto]
        self.emitted = upto
        return chunk
