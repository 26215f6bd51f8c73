"""The engine's asyncio side: request intake and the output streams.

`EngineIntake` is what an `Engine` (server/engine/engine.py) offers the event loop as an
`EngineClient` (server/engine/client.py): it checks what only the engine can check (an adapter
version's virtual tokens against the context, queue room), holds each request's adapter version,
and hands the new sequences to the step loop through its inbox. The step loop hands outputs back
to each request's `RequestStream` on that stream's event loop. Everything here runs on the event
loop's thread; what it shares with the engine thread goes through `_inbox` and `_lock`.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
import uuid
from typing import TYPE_CHECKING

from adapterserve.adapters.errors import UnknownAdapterError
from adapterserve.adapters.registry import AdapterRegistry, Entry
from adapterserve.server.config import Settings
from adapterserve.server.engine.beam import BeamSearch, BeamSearches
from adapterserve.server.engine.constraint import Grammars, sandbox_limits
from adapterserve.server.engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
)
from adapterserve.server.engine.kv_cache import BlockAllocator
from adapterserve.server.engine.output import OutputProcessor, RequestOutput
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.engine.scheduler import Sequence
from adapterserve.server.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from adapterserve.server.model.llama import Transformer


class OutputStream:
    """Async iterator of one request's outputs, fed by `deliver` on the event loop; leaving it
    early (cancelled: the client went away) calls `abort`, which subclasses define."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def deliver(self, out: RequestOutput) -> None:
        self._queue.put_nowait(out)

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self._queue.get()
        except BaseException:  # cancelled: the client went away
            self.abort()
            raise
        self.finished = out.finished
        return out

    def abort(self) -> None:
        raise NotImplementedError


class RequestStream(OutputStream):
    """One engine request's outputs (delivered by Engine._flush_outbox on the event loop);
    aborting it frees the request's blocks."""

    def __init__(
        self, request_id: str, engine: EngineIntake, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(request_id)
        self._engine, self._loop = engine, loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class EngineIntake:
    """The asyncio half of `Engine` (its base class): submit, abort, wait, stop. The step loop
    (the subclass) owns the attributes below; they are declared here for what this half reads."""

    settings: Settings
    registry: AdapterRegistry | None
    tokenizer: Tokenizer
    model: Transformer
    model_id: str
    max_model_len: int
    allocator: BlockAllocator
    output: OutputProcessor
    beams: BeamSearches
    healthy: bool
    ready: bool
    _inbox: queue.Queue[tuple[str, object]]
    _wake: threading.Event
    _lock: threading.Lock
    _num_queued: int
    _num_running: int
    _thread: threading.Thread | None
    _stopping: bool

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        model: str | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        return self.add_requests([(prompt_token_ids, params, request_id)], model)[0]

    def add_requests(
        self,
        requests: list[tuple[list[int], SamplingParams, str | None]],
        model: str | None = None,
    ) -> list[RequestStream]:
        """Submit (prompt ids, params, request id) for one `model`, all or none.

        The caller has checked each request: at most `capacity` of them, prompts of token ids in
        [0, vocab_size), prompt + max_tokens within the context. Each request holds the adapter
        version that is current now (see AdapterRegistry.hold), so that it is served even if the
        adapter is deleted before admission; that version's virtual tokens are counted against
        the context here (InvalidRequestError). An unknown model is ModelNotFoundError; a queue
        too full for them right now is QueueFullError (retryable); a stopped engine,
        EngineDeadError."""
        assert len(requests) <= self.capacity, "more requests than the engine ever holds"
        adapter = None if model is None or model == self.model_id else model
        entries = self._accept(adapter, [(prompt, params) for prompt, params, _ in requests])
        loop = asyncio.get_running_loop()
        streams = []
        owner = object()  # one call is one request: its choices share one fair share
        for i, (prompt, params, request_id) in enumerate(requests):
            seq = self._new_sequence(prompt, params, model, request_id, loop)
            seq.adapter, seq.entry = adapter, entries[i] if entries else None
            seq.owner = owner
            self._inbox.put(("add", seq))
            streams.append(seq.stream)
        self._wake.set()
        return streams

    def add_beam_searches(
        self,
        requests: list[tuple[list[int], SamplingParams, list[str]]],
        model: str | None = None,
    ) -> list[list[RequestStream]]:
        """Submit beam searches (prompt ids, params with beam_width, one request id per answer
        wanted: n <= beam_width) for one `model`, all or none; each answer stream gets one
        output, the whole answer, when its search ends. Refusals as in `add_requests`; a search
        whose beams could not all fit the KV cache at full length is InvalidRequestError."""
        for prompt, params, ids in requests:
            assert 1 <= len(ids) <= params.beam_width <= self.settings.max_num_seqs
            need = self.allocator.blocks_needed(len(prompt) + params.max_tokens, 0)
            if need * params.beam_width > self.allocator.num_blocks:
                raise InvalidRequestError(
                    f"{params.beam_width} beams of {len(prompt) + params.max_tokens} tokens need "
                    f"up to {need * params.beam_width} KV cache blocks; this server has "
                    f"{self.allocator.num_blocks}. Use fewer beams (best_of) or fewer tokens.",
                    "best_of",
                )
        adapter = None if model is None or model == self.model_id else model
        entries = self._accept(adapter, [(prompt, params) for prompt, params, _ in requests])
        loop = asyncio.get_running_loop()
        out = []
        owner = object()  # one call is one request: its searches share one fair share
        for i, (prompt, params, ids) in enumerate(requests):
            root = Sequence(ids[0], list(prompt), params, model or self.model_id, stream=None)
            root.adapter, root.entry, root.owner = adapter, entries[i] if entries else None, owner
            search = BeamSearch(
                params.beam_width,
                params.max_tokens,
                frozenset(self.output.rules.stop_ids(params)),
                params.length_penalty,
                params.early_stopping,
                params.min_tokens,
            )
            streams = [RequestStream(request_id, self, loop) for request_id in ids]
            self.beams.start(root, search, streams)
            self._inbox.put(("add", root))
            out.append(streams)
        self._wake.set()
        return out

    async def confirm(self, streams: list[RequestStream]) -> None:
        """Wait until the streams' requests are accepted (or raise the refusal). Here they are
        once add_requests returns; the cluster's engine proxy (server/cluster) answers later."""

    @functools.cached_property
    def grammars(self) -> Grammars:
        """Structured-output grammars compiled against this model's tokenizer (built on first
        use: a server that never sees a constraint never builds the matcher's tokenizer)."""
        return Grammars(self.tokenizer.hf, self.vocab_size, sandbox_limits(self.settings))

    @property
    def capacity(self) -> int:
        """Sequences the engine can hold at once: running plus waiting."""
        return self.settings.max_num_seqs + self.settings.max_queue_len

    def _accept(
        self, adapter: str | None, requests: list[tuple[list[int], SamplingParams]]
    ) -> list[Entry]:
        """All or none: one hold on the adapter's version per request, each request checked
        against the context with that version's virtual tokens, queue room reserved."""
        entries = self._hold(adapter, len(requests))
        try:
            num_virtual = entries[0].num_virtual_tokens if entries else 0
            for prompt, params in requests:
                self._check_fits(prompt, params, num_virtual)
            self._reserve_queue(len(requests))
        except BaseException:
            for entry in entries:
                self.registry.release(entry)
            raise
        return entries

    def _hold(self, adapter: str | None, count: int) -> list[Entry]:
        """One hold on the adapter's current version per request (none for the base model)."""
        if adapter is None:
            return []
        if self.registry is None:
            raise ModelNotFoundError(adapter)
        entries = []
        try:
            for _ in range(count):
                entries.append(self.registry.hold(adapter))
        except UnknownAdapterError:
            for entry in entries:
                self.registry.release(entry)
            raise ModelNotFoundError(adapter) from None
        return entries

    def _check_fits(self, prompt: list[int], params: SamplingParams, num_virtual: int) -> None:
        """The one check only the engine can make: the held version's virtual tokens count
        against the context. The rest was checked where the request came in."""
        assert prompt and min(prompt) >= 0 and max(prompt) < self.vocab_size, "bad prompt ids"
        assert len(prompt) + params.max_tokens <= self.max_model_len, "over the context"
        if num_virtual + len(prompt) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens) + the adapter's virtual tokens ({num_virtual}) + "
                f"max_tokens ({params.max_tokens}) exceeds the context length "
                f"{self.max_model_len}; shorten the prompt or lower max_tokens",
                "max_tokens",
            )

    def _reserve_queue(self, count: int) -> None:
        with self._lock:
            if not self.healthy or self._stopping:
                raise EngineDeadError("the engine is not running")
            free_slots = max(0, self.settings.max_num_seqs - self._num_running)
            if self._num_queued + count > self.settings.max_queue_len + free_slots:
                raise QueueFullError("the server is at capacity; retry later")
            self._num_queued += count

    def _new_sequence(
        self,
        prompt: list[int],
        params: SamplingParams,
        model: str | None,
        request_id: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> Sequence:
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(request_id, self, loop)
        return Sequence(request_id, list(prompt), params, model or self.model_id, stream)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def wake(self) -> None:
        """Run a step soon (an adapter finished loading, a request came in)."""
        self._wake.set()

    @property
    def vocab_size(self) -> int:
        """Valid token ids are [0, vocab_size): the model's embedding rows."""
        return self.model.args.vocab_size

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    async def sync_metrics(self) -> None:
        """EngineClient: this engine writes the app's Metrics itself."""

    async def until_ready(self, poll_s: float = 0.05) -> None:
        """Returns once the engine is ready (its compiled step warmed up), stopping or failed."""
        while not self.ready and self.healthy and not self._stopping:
            await asyncio.sleep(poll_s)

    async def stop(self) -> None:
        """End the step loop; requests still in it finish with "abort"."""
        self.ready = False
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.settings.shutdown_timeout_s)
        if "grammars" in self.__dict__:  # its sandbox's worker processes
            self.grammars.close()

    @property
    def num_kv_blocks_used(self) -> int:
        return self.allocator.num_used
