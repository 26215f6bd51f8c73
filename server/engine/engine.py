"""The step loop: request intake, a thread that schedules, builds and runs each step, and the
hand-over of outputs to the event loop.

Requests enter with `add_requests` (from the asyncio side) and leave as `RequestOutput`s on a
per-request `RequestStream`. Each step: the scheduler's StepPlan -> the batch builder -> one
forward (eager or the compiled decode step) -> the output processor (server/engine/output.py:
sampling, detokenization, every stop rule) -> finished sequences leave the scheduler, their KV
blocks and adapter holds are freed, and the outputs go out. Engines are made and started by
server/engine/bootstrap.py.

Requests are validated where they come in (the HTTP routers; the evaluation runner fits its
own); the engine checks only what it alone knows (an adapter version's virtual tokens against
the context) and asserts the rest.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from adapterserve.adapters.errors import AdapterError, UnknownAdapterError
from adapterserve.adapters.kinds import kind_for
from adapterserve.adapters.registry import AdapterRegistry, Entry
from adapterserve.server.config import Settings
from adapterserve.server.engine.beam import BeamGroup, BeamSearch, BeamSearches
from adapterserve.server.engine.constraint import Grammars, sandbox_limits
from adapterserve.server.engine.detokenizer import IncrementalDetokenizer
from adapterserve.server.engine.errors import (
    EngineDeadError,
    EngineFailure,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    RequestAbortedError,
)
from adapterserve.server.engine.kv_cache import BlockAllocator
from adapterserve.server.engine.output import OutputProcessor, RequestOutput
from adapterserve.server.engine.runner import ModelRunner
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.engine.scheduler import Scheduler, Sequence, Status, StepPlan
from adapterserve.server.metrics import Metrics
from adapterserve.server.model.compiled import CompiledDecode
from adapterserve.server.model.llama import Transformer
from adapterserve.server.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STEP_LOG_LEN = 4096  # steps kept in Engine.step_log
DELETED_MODEL_LABEL = "(deleted adapter)"  # metrics label of requests that outlive their adapter
FATAL_MESSAGE = "internal engine error; the server is restarting"  # no internals to clients


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

    def __init__(self, request_id: str, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(request_id)
        self._engine, self._loop = engine, loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        settings: Settings,
        metrics: Metrics,
        model_id: str,
        max_model_len: int,
        num_blocks: int,
        registry: AdapterRegistry | None = None,
    ) -> None:
        self.tokenizer, self.settings, self.metrics = tokenizer, settings, metrics
        self.model_id, self.max_model_len = model_id, max_model_len
        self.allocator = BlockAllocator(
            num_blocks, settings.block_size, caching=settings.enable_prefix_caching
        )
        self.registry = registry
        self.scheduler = Scheduler(
            self.allocator,
            settings.max_num_seqs,
            settings.max_num_batched_tokens,
            prepare=self._prepare,
            max_request_share=settings.max_request_share,
        )
        self.runner = ModelRunner(model, settings, max_model_len, num_blocks,
                                  registry.pool.num_slots if registry is not None else 1)  # fmt: skip
        self.output = OutputProcessor(tokenizer, max_model_len)
        self._doomed: list[tuple[Sequence, AdapterError]] = []  # not admissible: fail them
        self.healthy, self.ready = True, False
        self.restarting = False  # EngineClient: an engine in this process is never restarted
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._num_queued = 0  # submitted, not yet admitted to the running batch
        self._num_running = 0  # len(scheduler.running), published under _lock with _num_queued
        self._seqs: dict[str, Sequence] = {}
        self.beams = BeamSearches(self)  # the beam searches' lifecycle (server/engine/beam.py)
        self._outbox: list[tuple[RequestStream, RequestOutput]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Observability: (request_id, model) of every sequence in each recent step, newest last.
        self.step_log: deque[tuple[tuple[str, str], ...]] = deque(maxlen=STEP_LOG_LEN)

    # ---- asyncio side ---------------------------------------------------------------------
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
                params.beam_width, params.max_tokens, frozenset(self.output.rules.stop_ids(params)),
                params.length_penalty, params.early_stopping, params.min_tokens,
            )  # fmt: skip
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
        self, prompt: list[int], params: SamplingParams, model: str | None,
        request_id: str | None, loop: asyncio.AbstractEventLoop,
    ) -> Sequence:  # fmt: skip
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

    # ---- engine thread --------------------------------------------------------------------
    def run(self, on_started: Callable[[], None] | None = None) -> None:
        """The step loop, on the calling thread (bootstrap.start_engine's) until `stop`, after
        the compiled step's warm-up (then `ready`); a fault in a step fails every request and
        marks the engine unhealthy."""
        self._thread = threading.current_thread()
        self.ready = self.compiled is None  # nothing to warm up: ready before start_engine returns
        if on_started is not None:
            on_started()
        try:
            self.runner.warm_up()  # before `ready`: /ready and new requests answer 503 until then
            self.ready = not self._stopping
            while not self._stopping:
                self._drain_inbox()
                self._flush_outbox()
                if not self.scheduler.has_work():
                    self._publish_stats(0)
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self.step()
                self._flush_outbox()
            self._fail_all("abort", RequestAbortedError("the engine stopped"))
        except BaseException as e:  # noqa: BLE001 - any fault in a step is fatal by design
            log.exception("engine step failed; the engine stops")
            self.healthy = self.ready = False
            self._fail_all("error", EngineDeadError(FATAL_MESSAGE))
            if self.on_fatal is not None:
                self.on_fatal(e)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                seq = item
                self._seqs[seq.request_id] = seq
                if seq.group is None:
                    self.output.add(seq)
                else:
                    self.beams.admit(seq.group)
                self.scheduler.add(seq)
            elif (group := self.beams.groups.get(item)) is not None:
                self.beams.end(
                    group, "abort", RequestAbortedError("the client aborted the request")
                )
            elif (seq := self._seqs.get(item)) is not None:
                self._finish(seq, "abort", RequestAbortedError("the client aborted the request"))

    def step(self) -> None:
        """One iteration: schedule, build the batch, forward, outputs."""
        plan = self.scheduler.schedule()
        self._count_admissions(plan)
        self._fail_doomed()
        if plan is None:
            self._wake.wait(0.01)  # blocked on KV blocks: nothing runnable this instant
            return
        self.step_log.append(tuple((seq.request_id, seq.model) for seq, _ in plan.work))
        if plan.preempted:
            self.metrics.preemptions.inc(len(plan.preempted))
        if self.registry is not None:
            adapters = {seq.adapter for seq, _ in plan.work} - {None}
            self.metrics.on_step_adapters(len(adapters))
        logits = self.runner.forward(plan)
        for seq, n in plan.work:
            seq.num_computed += n  # their K/V are in the cache now
        for seq, out in self.output.process(plan, logits):
            if out.finished:
                self._retire(seq, out.finish_reason)
            self._send(seq, out)
        self.beams.advance(plan)
        self._publish_stats(plan.num_tokens)

    @property
    def model(self) -> Transformer:
        """The model the runner steps (a test may wrap it to inject a fault)."""
        return self.runner.model

    @model.setter
    def model(self, model: Transformer) -> None:
        self.runner.model = model

    @property
    def compiled(self) -> CompiledDecode | None:
        """The compiled decode step, when there is one (the benchmarks switch it off and on)."""
        return self.runner.compiled

    @compiled.setter
    def compiled(self, compiled: CompiledDecode | None) -> None:
        self.runner.compiled = compiled

    @property
    def warming(self) -> bool:
        """Compiling the decode step's shapes (run, before ready)."""
        return self.runner.warming

    def enable_compile(self) -> None:
        self.runner.enable_compile()

    # ---- adapters (engine thread) ---------------------------------------------------------
    def _prepare(self, seq: Sequence) -> bool:
        """Before admission: the held adapter version's slot (False while it loads), bound by
        its kind (adapters.kinds), virtual tokens included."""
        if seq.entry is None or seq.lease is not None:
            return True
        assert self.registry is not None
        try:
            lease = self.registry.acquire(seq.entry)
        except AdapterError as e:
            self._doomed.append((seq, e))
            return False
        if lease is None:
            return False
        seq.lease = lease
        seq.cache_identity = f"adapter:{lease.entry.version}"  # versions are never reused
        kind = kind_for(lease.kind)
        seq.bind(kind.bind(self.registry.pool, lease.slot, lease.entry.num_virtual_tokens))
        return True

    def _fail_doomed(self) -> None:
        doomed, self._doomed = self._doomed, []
        for seq, error in doomed:
            if seq.status is not Status.FINISHED:
                self._finish(seq, "error", error)

    def _count_admissions(self, plan: StepPlan | None) -> None:
        admitted, requeued = (len(plan.admitted), len(plan.preempted)) if plan else (0, 0)
        with self._lock:
            self._num_queued += requeued - admitted
            self._num_running = len(self.scheduler.running)

    # ---- BeamHost: what the beam searches use (engine thread) -------------------------------
    def leave(self, seq: Sequence) -> None:
        with self._lock:
            if seq.status is Status.WAITING:
                self._num_queued -= 1
            self.scheduler.remove(seq)
            self._num_running = len(self.scheduler.running)

    def ended(self, group: BeamGroup) -> None:
        self._seqs.pop(group.root.request_id, None)

    def release(self, entry: Entry) -> None:
        self.registry.release(entry)

    def emit(self, stream: RequestStream, out: RequestOutput) -> None:
        self._outbox.append((stream, out))

    def record(self, seq: Sequence, reason: str, num_output_tokens: int) -> None:
        self._record(seq, reason, num_output_tokens)

    def detokenize(self, token_ids: list[int]) -> str:
        detok = IncrementalDetokenizer(self.tokenizer)
        for token in token_ids:
            detok.add(token)
        return detok.flush()

    def running_changed(self) -> None:
        with self._lock:
            self._num_running = len(self.scheduler.running)

    # ---- finishing and handing out --------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str, error: EngineFailure) -> None:
        """End a sequence from here (abort, error): its last output, then retire it."""
        if seq.group is not None:
            self.beams.end(seq.group, reason, error)
            return
        out = self.output.finish(seq, reason, error)
        self._retire(seq, reason)
        self._send(seq, out)

    def _retire(self, seq: Sequence, reason: str) -> None:
        """A finished sequence leaves the scheduler (its KV blocks freed) and its adapter hold
        goes; its outcome is counted."""
        self.leave(seq)
        if seq.entry is not None:
            entry, seq.entry, seq.lease = seq.entry, None, None
            self.registry.release(entry)
        self._seqs.pop(seq.request_id, None)
        self._record(seq, reason)

    def _send(self, seq: Sequence, out: RequestOutput) -> None:
        self._outbox.append((seq.stream, out))

    def _flush_outbox(self) -> None:
        """Hand a step's outputs to the event loop in one wake-up per loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, out in self._outbox:
            by_loop.setdefault(stream.loop, []).append((stream, out))
        self._outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver_all, items)

    def _record(self, seq: Sequence, reason: str, num_output_tokens: int | None = None) -> None:
        """Count a finished request (a beam-search answer: its root, its own output length;
        its first token is its whole answer)."""
        now = time.monotonic()
        first = (
            seq.first_token_time
            if seq.group is None
            else (now if reason in ("stop", "length") else None)
        )
        ttft = first - seq.arrival if first else None
        model = seq.model
        if seq.adapter is not None and not self.registry.exists(seq.adapter):
            model = DELETED_MODEL_LABEL  # its series are gone: one shared label, not one per name
        outputs = len(seq.output_ids) if num_output_tokens is None else num_output_tokens
        self.metrics.on_request_done(
            model, reason, len(seq.prompt_ids) - seq.num_virtual, outputs, ttft, now - seq.arrival
        )

    def _fail_all(self, reason: str, error: EngineFailure) -> None:
        self._drain_inbox()
        for seq in list(self._seqs.values()):
            self._finish(seq, reason, error)
        self._flush_outbox()
        self._publish_stats(0)

    def _publish_stats(self, num_tokens: int) -> None:
        s = self.scheduler
        a = self.allocator
        self.metrics.on_step(num_tokens, len(s.running), len(s.waiting), a.num_used, a.num_blocks)
        self.metrics.on_prefix_cache(
            a.num_used, a.num_cached, a.num_free - a.num_cached, s.prefix_queries, s.prefix_hits
        )


def _deliver_all(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.deliver(out)
