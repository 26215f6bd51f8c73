"""Structured outputs: a grammar (JSON schema, regex, choice, Lark/GBNF) that a sequence's tokens
must follow, enforced by llguidance.

Why llguidance: its matcher is Rust with a bounded cost per token (derivative-based lexer,
Earley parser with step limits, `LLParserLimits`), so a client's schema or pattern cannot stall
the engine; it parses Lark as well as GBNF; it takes a Hugging Face tokenizer directly. Against
xgrammar (`benchmarks/bench_grammar_engines.py`), xgrammar's masks are much cheaper once a
schema is compiled and llguidance reaches its first mask sooner (BENCHMARKS.md, 'llguidance vs
xgrammar, this CPU'); we keep llguidance and fill its masks beside the forward (below), which
keeps constrained streams close to free ones (`benchmarks/bench_structured.py`; BENCHMARKS.md,
'Structured outputs: JSON schema vs free (issue 15)').

A client's grammar is untrusted native input: a 1000-deep `$ref` chain overflowed llguidance's
stack and killed the server; a 20k-object enum froze the event loop, then panicked (BENCHMARKS.md, 'Hardening replays:
heavy requests beside a running stream (issue 24)'). So
it is compiled first in the grammar sandbox (GrammarSandbox: a few worker processes,
server/engine/grammar_worker.py, each compile under a wall-clock deadline and an address-space
cap, with llguidance's own limits set): there it is converted, validated, made into a matcher
and asked for its first mask. A crash, an overrun or a panic kills that worker only (it is
replaced) and refuses the grammar, a 400 naming the field; refusals are cached like successes.
Only a grammar that passed is built in the serving process, one matcher per sequence, on a
thread with a larger stack than the sandbox's, off the event loop (server/api/serving.py). The
engine only asks each matcher for the next token mask and feeds it the sampled token
(OutputProcessor); llguidance's step limits bound each mask. Preemption keeps the matcher: a recomputed
sequence's tokens are the ones it already consumed.

Masks overlap the forward: as soon as a matcher has consumed a token (or is made), the bitmask
of its next token is filled on a small worker pool (llguidance drops the GIL while it fills),
while the engine thread runs the next step's forward; `mask` waits for that fill, and only
applies it. A row's mask thus costs the engine thread the wait for what the forward did not
hide, not the whole fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")

log = logging.getLogger(__name__)


class GrammarError(ValueError):
    """The grammar cannot be compiled; the message says why (a 400 at the HTTP boundary)."""


# fills next-token bitmasks beside the engine thread: a few workers, at most half the cores (the
# rest is the forward's)
_FILLS = ThreadPoolExecutor(
    max_workers=max(1, min(4, (os.cpu_count() or 2) // 2)), thread_name_prefix="grammar-mask"
)


# llguidance's token bitmask, without llguidance.torch: importing that module imports torch's
# compiler (every stream stalled on the first structured request), and its apply is a
# torch.compile'd function whose first call compiled on the engine thread, every stream waiting
# (BENCHMARKS.md, 'Figures quoted from the code').
_BIT = torch.arange(32, dtype=torch.int32)


def allocate_bitmask(vocab_size: int) -> torch.Tensor:
    """One row of llguidance's bitmask: bit (t % 32) of int32 word t // 32 allows token t."""
    return torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)


def fill_bitmask(matcher: Any, bitmask: torch.Tensor) -> None:
    """The matcher's next-token mask into `bitmask` (llguidance drops the GIL while it fills)."""
    matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """-inf, in place, on every token of `logits` (one row) that `bitmask` does not allow."""
    allowed = ((bitmask[:, None] >> _BIT) & 1).reshape(-1)[: logits.shape[0]]
    logits.masked_fill_(allowed == 0, float("-inf"))


class Constraint:
    """One sequence's matcher: masks the next token's logits, consumes the sampled token. The
    next mask is filled in the background from the moment the state that decides it is known
    (made, or a token consumed)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self._bitmask = allocate_bitmask(vocab_size)  # reused every step
        self._fill: Future | None = None
        self._next()

    def _next(self) -> None:
        """With no fill in flight (the matcher is the caller's alone): note whether it is done,
        and if not, start filling its next mask. Nothing else touches the matcher until that
        fill is waited for."""
        self._done = self.matcher.is_stopped() or self.matcher.is_error()
        if not self._done:
            self._fill = _FILLS.submit(fill_bitmask, self.matcher, self._bitmask)

    def wait_fill(self) -> None:
        """Block until the mask being filled is ready (mask() then only applies it)."""
        if self._fill is not None:
            self._fill.result()

    def mask(self, logits: torch.Tensor, eos_token_ids: frozenset[int]) -> None:
        """Set every token the grammar does not allow next to -inf, in place (one row). A
        matcher that allows nothing (it failed) lets the sequence end: EOS only."""
        fill, self._fill = self._fill, None
        if fill is not None:
            fill.result()
        else:
            fill_bitmask(self.matcher, self._bitmask)
        apply_bitmask(logits[: self.vocab_size], self._bitmask)
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


class GrammarUnavailable(RuntimeError):
    """The grammar sandbox cannot start a worker: structured outputs are down for now (a 503,
    not the client's fault)."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one client grammar may cost the sandbox (settings: --grammar-*)."""

    workers: int = 2  # worker processes: grammars compiled at once
    timeout_s: float = 2.0  # wall clock for one compile, from the moment a worker takes it
    memory_mb: int = 1024  # address space a worker may add while compiling (RLIMIT_AS)


def sandbox_limits(settings: Any) -> SandboxLimits:
    """The sandbox's limits from the server's settings (--grammar-workers, --grammar-timeout-s,
    --grammar-memory-mb)."""
    return SandboxLimits(
        settings.grammar_workers, settings.grammar_timeout_s, settings.grammar_memory_mb
    )


# llguidance's own limits, set explicitly (its defaults, but for terse errors: the client's
# grammar state is not echoed into logs): they bound each mask's cost in the engine too
PARSER_LIMITS = {
    "max_items_in_row": 2000,
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 200_000,
    "step_max_items": 50_000,
    "max_lexer_states": 250_000,
    "max_grammar_size": 500_000,
    "verbose_errors": False,
}
# The sandbox compiles on a 2 MiB stack; the server builds matchers on a 16 MiB one: a grammar
# deep enough to overflow the server's stack has crashed a worker first.
WORKER_STACK_BYTES = 2 * 2**20
MATCHER_STACK_BYTES = 16 * 2**20
WORKER_START_TIMEOUT_S = 60.0
WORKER = Path(__file__).with_name("grammar_worker.py")
HEADER = struct.Struct(">I")


def _frame(message: Any) -> bytes:
    data = json.dumps(message).encode()
    return HEADER.pack(len(data)) + data


class _Worker:
    """One sandbox process (server/engine/grammar_worker.py) and its pipes."""

    def __init__(self, init: bytes) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.last_words = ""  # the tail of its stderr, once stopped
        # -I: no environment, no user site, no script folder on sys.path; the worker imports
        # only the standard library and llguidance
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            ready = self.call(init, time.monotonic() + WORKER_START_TIMEOUT_S)
        except TimeoutError:
            ready = None
        if not (isinstance(ready, dict) and ready.get("ready")):
            why = self.stop()
            raise GrammarUnavailable(f"the grammar sandbox did not start ({why})")

    def call(self, frame: bytes, deadline: float) -> Any:
        """Send one frame, wait for the answer until `deadline` (TimeoutError); None: the worker
        died."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(frame)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        header = self._read(HEADER.size, deadline)
        if header is None:
            return None
        body = self._read(HEADER.unpack(header)[0], deadline)
        return None if body is None else json.loads(body)

    def _read(self, size: int, deadline: float) -> bytes | None:
        assert self.proc.stdout is not None
        fd, data = self.proc.stdout.fileno(), bytearray()
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(size - len(data), 1 << 20))
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def stop(self) -> str:
        """Kill the worker (if it still runs) and say how it ended: 'SIGSEGV', 'exit 1', ...;
        its last stderr lines go to the log."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        self._stderr.seek(max(0, self._stderr.seek(0, os.SEEK_END) - 2000))
        tail = self.last_words = self._stderr.read().decode(errors="replace").strip()
        self._stderr.close()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]
        why = signal.Signals(-code).name if code < 0 else f"exit {code}"
        if tail:
            log.info("grammar worker %s ended (%s): %s", self.proc.pid, why, tail[-500:])
        return why


class GrammarSandbox:
    """A small pool of worker processes that compile client grammars (SECURITY: native code
    that may crash never runs first in the serving process). Each compile gets a wall-clock
    deadline and an address-space cap; a worker that crashes or overruns is killed and
    replaced, and the grammar is refused (GrammarError) with the reason."""

    def __init__(
        self,
        tokenizer_json: str,
        n_vocab: int,
        eos: list[int],
        limits: SandboxLimits = SandboxLimits(),
    ) -> None:
        self.limits = limits
        self._init = _frame(
            {
                "tokenizer": tokenizer_json,
                "n_vocab": n_vocab,
                "eos": eos,
                "memory_bytes": limits.memory_mb * 2**20,
                "stack_bytes": WORKER_STACK_BYTES,
                "limits": PARSER_LIMITS,
            }
        )
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(limits.workers)
        self.crashes = self.timeouts = 0  # counted for the log and the tests

    def compile(self, kind: str, spec: Any) -> str:
        """The llguidance grammar for (kind, spec), compiled, validated and tried (first mask)
        in a worker; GrammarError says why not, GrammarUnavailable that no worker runs."""
        job = _frame({"kind": kind, "spec": spec})
        with self._slots:
            worker = self._take()
            try:
                reply = worker.call(job, time.monotonic() + self.limits.timeout_s)
            except TimeoutError:
                reply = "timeout"
            if not isinstance(reply, dict):
                why = worker.stop()
                self._replace()
                if reply == "timeout":
                    self.timeouts += 1
                    raise GrammarError(
                        f"grammar too complex: compiling it took longer than {self.limits.timeout_s:g} s"
                    )
                self.crashes += 1
                log.warning("a client grammar (%s) crashed its sandbox worker (%s)", kind, why)
                if "memory allocation" in worker.last_words:  # Rust's abort on a failed alloc
                    raise GrammarError(
                        f"grammar too complex: compiling it needs more than {self.limits.memory_mb} MiB"
                    )
                raise GrammarError(f"grammar too complex: its compiler crashed ({why})")
            with self._lock:
                self._idle.append(worker)
        if "error" in reply:
            raise GrammarError(str(reply["error"])[:500])
        return str(reply["grammar"])

    def _take(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Worker(self._init)

    def _replace(self) -> None:
        """Start a worker for the one just lost, in the background: the next grammar does not
        wait for it to start."""

        def start() -> None:
            with contextlib.suppress(GrammarUnavailable):
                worker = _Worker(self._init)
                with self._lock:
                    if len(self._idle) < self.limits.workers:
                        self._idle.append(worker)
                        return
                worker.stop()

        threading.Thread(target=start, name="grammar-sandbox-start", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop()


def tokenizer_json(hf_tokenizer: Any) -> str:
    """The HF fast tokenizer as tokenizer.json text, without padding or truncation: what
    llguidance builds its tokenizer from (here and in the sandbox's workers)."""
    backend = copy.copy(hf_tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


def _on_big_stack(work: Callable[[], Any]) -> Any:
    """Run `work` on a fresh thread with a MATCHER_STACK_BYTES stack and return its result (a
    matcher's construction recurses as deep as its grammar: the sandbox tried it on less)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = exc

    previous = threading.stack_size(MATCHER_STACK_BYTES)
    try:
        thread = threading.Thread(target=run, name="grammar-matcher")
        thread.start()
    finally:
        threading.stack_size(previous)
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class Grammars:
    """Compiles request grammars against one tokenizer, in the sandbox (GrammarSandbox, started
    on first use). The last COMPILED_CACHE distinct constraints are kept compiled or refused,
    keyed by a hash of their canonical form and bounded in bytes too: agent frameworks send the
    same schema with every call, and a retried grammar bomb costs nothing the second time.

    Everything here blocks (a compile up to the sandbox's deadline, a matcher's construction):
    the server calls `compile_async` and `constraints_async`, which run it on threads."""

    COMPILED_CACHE = 256
    COMPILED_CACHE_BYTES = 64 * 2**20

    def __init__(
        self, hf_tokenizer: Any, vocab_size: int, limits: SandboxLimits = SandboxLimits()
    ) -> None:
        self._hf, self.vocab_size, self.limits = hf_tokenizer, vocab_size, limits
        self._tokenizer: Any = None
        self._sandbox: GrammarSandbox | None = None
        self._compiled: OrderedDict[bytes, str | GrammarError] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        """llguidance's tokenizer in this process (for the matchers), built once."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                self._tokenizer = llguidance.LLTokenizer(
                    tokenizer_json(self._hf),
                    n_vocab=self.vocab_size,
                    eos_token=self._hf.eos_token_id,
                )
            return self._tokenizer

    @property
    def sandbox(self) -> GrammarSandbox:
        with self._lock:
            if self._sandbox is None:
                eos = [] if self._hf.eos_token_id is None else [self._hf.eos_token_id]
                self._sandbox = GrammarSandbox(
                    tokenizer_json(self._hf), self.vocab_size, eos, self.limits
                )
            return self._sandbox

    def compile(self, kind: str, spec: Any) -> str:
        """The llguidance grammar for a request's constraint, checked against the tokenizer in
        the sandbox: GrammarError says what is wrong. Cached by (kind, the spec's canonical
        JSON), refusals too."""
        canonical = json.dumps([kind, spec], sort_keys=True, separators=(",", ":"))
        key = hashlib.sha256(canonical.encode()).digest()
        with self._lock:
            found = self._compiled.get(key)
            if found is not None:
                self._compiled.move_to_end(key)
        if found is None:
            try:
                found = self.sandbox.compile(kind, spec)
            except GrammarError as exc:
                found = exc
            self._remember(key, found)
        if isinstance(found, GrammarError):
            raise GrammarError(str(found))
        return found

    def _remember(self, key: bytes, found: str | GrammarError) -> None:
        size = len(found) if isinstance(found, str) else 0
        with self._lock:
            if key in self._compiled:
                return
            self._compiled[key] = found
            self._cached_bytes += size
            while (
                len(self._compiled) > self.COMPILED_CACHE
                or self._cached_bytes > self.COMPILED_CACHE_BYTES
            ):
                _, old = self._compiled.popitem(last=False)
                self._cached_bytes -= len(old) if isinstance(old, str) else 0

    async def compile_async(self, kind: str, spec: Any) -> str:
        """`compile` on a worker thread: the event loop never waits for a grammar."""
        return await asyncio.to_thread(self.compile, kind, spec)

    def constraint(self, grammar: str) -> Constraint:
        return self.constraints(grammar, 1)[0]

    def constraints(self, grammar: str, count: int) -> list[Constraint]:
        """`count` matchers for a compiled grammar: one built (on a big stack), the rest
        copied."""
        import llguidance

        tokenizer = self.tokenizer
        matcher = _on_big_stack(
            lambda: llguidance.LLMatcher(
                tokenizer, grammar, log_level=0, limits=llguidance.LLParserLimits(**PARSER_LIMITS)
            )
        )
        if matcher.is_error():
            raise GrammarError(str(matcher.get_error())[:500])
        matchers = [matcher] + [matcher.deep_copy() for _ in range(count - 1)]
        constraints = [Constraint(m, self.vocab_size) for m in matchers]
        for constraint in constraints:  # a big grammar's first mask can take seconds:
            constraint.wait_fill()  # here, never on the engine thread with every stream waiting
        return constraints

    async def constraints_async(self, grammar: str, count: int) -> list[Constraint]:
        return await asyncio.to_thread(self.constraints, grammar, count)

    def warm(self, compile: bool = True, matchers: bool = True) -> None:
        """Pay at start what the first constrained request would: a sandbox worker started
        and llguidance's tokenizer built there (`compile`), and this process's tokenizer and a
        first matcher (`matchers`). Blocking; the server runs it on a thread after start. A
        failure is logged: the first request then pays (or answers why)."""
        try:
            if compile:
                self.compile("json_object", None)
            if matchers:
                import llguidance

                self.constraint(llguidance.grammar_from("regex", "[a-z]+"))
        except Exception as exc:  # noqa: BLE001 - warming is an optimisation only
            log.warning("warming the structured-output machinery failed: %r", exc)

    def close(self) -> None:
        with self._lock:
            sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            sandbox.close()
