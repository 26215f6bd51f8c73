"""Structured outputs: a grammar (JSON schema, regex, choice, Lark/GBNF) that a sequence's tokens
must follow, enforced by llguidance.

Why llguidance: its matcher is Rust with a bounded cost per token (derivative-based lexer,
Earley parser with step limits, `LLParserLimits`), so a client's schema or pattern cannot stall
the engine; it parses Lark as well as GBNF; it takes a Hugging Face tokenizer directly. Measured
against xgrammar on this CPU (`benchmarks/bench_grammar_engines.py`, BENCHMARKS.md): xgrammar's
masks are ~30x cheaper once a schema is compiled (0.004 vs 0.14 ms mean per token over the
default model's 49k vocabulary), llguidance reaches its first mask sooner (5 vs 11-27 ms); we
keep llguidance and fill its masks beside the forward (below). 16 constrained streams run at
0.95 of free ones (`benchmarks/bench_structured.py`).

A grammar is compiled and checked where the request comes in (server/serving.py), one matcher
per sequence made there too; the engine only asks each matcher for the next token mask and
feeds it the sampled token (OutputProcessor). Preemption keeps the matcher: a recomputed
sequence's tokens are the ones it already consumed.

Masks overlap the forward: as soon as a matcher has consumed a token (or is made), the bitmask
of its next token is filled on a small worker pool (llguidance drops the GIL while it fills),
while the engine thread runs the next step's forward; `mask` waits for that fill, and only
applies it. A row's mask thus costs the engine thread the wait for what the forward did not
hide, not the whole fill.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class GrammarError(ValueError):
    """The grammar cannot be compiled; the message says why (a 400 at the HTTP boundary)."""


# fills next-token bitmasks beside the engine thread: a few workers, at most half the cores (the
# rest is the forward's)
_FILLS = ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) // 2)),
                            thread_name_prefix="grammar-mask")  # fmt: skip


class Constraint:
    """One sequence's matcher: masks the next token's logits, consumes the sampled token. The
    next mask is filled in the background from the moment the state that decides it is known
    (made, or a token consumed)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import llguidance.torch as llt

        self.matcher, self.vocab_size = matcher, vocab_size
        self._bitmask = llt.allocate_token_bitmask(1, vocab_size)  # reused every step
        self._fill: Future | None = None
        self._next()

    def _next(self) -> None:
        """With no fill in flight (the matcher is the caller's alone): note whether it is done,
        and if not, start filling its next mask. Nothing else touches the matcher until that
        fill is waited for."""
        import llguidance.torch as llt

        self._done = self.matcher.is_stopped() or self.matcher.is_error()
        if not self._done:
            self._fill = _FILLS.submit(llt.fill_next_token_bitmask, self.matcher, self._bitmask, 0)

    def mask(self, logits: torch.Tensor, eos_token_ids: frozenset[int]) -> None:
        """Set every token the grammar does not allow next to -inf, in place (one row). A
        matcher that allows nothing (it failed) lets the sequence end: EOS only."""
        import llguidance.torch as llt

        fill, self._fill = self._fill, None
        if fill is not None:
            fill.result()
        else:
            llt.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        row = logits[None, : self.vocab_size]
        llt.apply_token_bitmask_inplace(row, self._bitmask)
        logits[self.vocab_size :] = float("-inf")  # rows past the tokenizer: never text
        if not torch.isfinite(logits).any():
            logits[sorted(eos_token_ids)] = 0.0

    def consume(self, token: int) -> None:
        """Advance past the sampled token (allowed by the mask, or EOS after a failure)."""
        if self._fill is not None:  # masked by something else (it cannot be: defensive)
            self._fill.result()
            self._fill = None
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)
        self._next()

    @property
    def done(self) -> bool:
        """The grammar is complete (and its end consumed), or failed: nothing more follows (as
        of the last token consumed: read while the next mask may be filling)."""
        return self._done


class Grammars:
    """Compiles request grammars against one tokenizer (built once, lazily). The last
    COMPILED_CACHE distinct constraints are kept compiled (or refused): clients such as agent
    frameworks send the same schema with every call."""

    COMPILED_CACHE = 256

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf, self.vocab_size, self._tokenizer = hf_tokenizer, vocab_size, None
        self._compiled: OrderedDict[tuple[str, str], str | GrammarError] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
        return self._tokenizer

    def compile(self, kind: str, spec: Any) -> str:
        """The llguidance grammar for a request's constraint, checked against the tokenizer:
        GrammarError says what is wrong. Cached by (kind, the spec's canonical JSON)."""
        key = (kind, json.dumps(spec, sort_keys=True, separators=(",", ":")))
        with self._lock:
            found = self._compiled.get(key)
            if found is not None:
                self._compiled.move_to_end(key)
        if found is None:
            try:
                found = self._compile(kind, spec)
            except GrammarError as exc:
                found = exc
            with self._lock:
                self._compiled[key] = found
                while len(self._compiled) > self.COMPILED_CACHE:
                    self._compiled.popitem(last=False)
        if isinstance(found, GrammarError):
            raise GrammarError(str(found))
        return found

    def _compile(self, kind: str, spec: Any) -> str:
        import llguidance

        try:
            if kind == "json_object":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    '{"type": "object"}', defaults={"whitespace_flexible": False}
                )
            elif kind == "json_schema":
                text = spec if isinstance(spec, str) else json.dumps(spec)
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    text, defaults={"whitespace_flexible": False}
                )
            elif kind == "regex":
                grammar = llguidance.grammar_from("regex", spec)
            elif kind == "choice":
                grammar = llguidance.grammar_from("choice", json.dumps(list(spec)))
            elif kind == "grammar":
                grammar = llguidance.grammar_from("grammar", spec)
            else:
                raise GrammarError(f"unknown constraint kind {kind!r}")
        except (ValueError, TypeError) as exc:
            raise GrammarError(str(exc)[:500]) from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise GrammarError("; ".join(str(m).strip() for m in messages)[:500] or "invalid grammar")
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(str(matcher.get_error())[:500])
        return Constraint(matcher, self.vocab_size)
