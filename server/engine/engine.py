"""The step loop: a thread that binds, schedules, builds and runs each step, and hands the
outputs to the event loop.

Requests come in through `EngineIntake` (server/engine/intake.py, the asyncio side this class
extends) and leave as `RequestOutput`s on a per-request `RequestStream`. Each step: the waiting
sequences the scheduler may admit get their adapter slots (`_bind_candidates`) -> the
scheduler's StepPlan -> the model runner (batch builder, prefix writes, one forward, eager or
the compiled decode step) -> the output processor (server/engine/output.py: sampling,
detokenization, every stop rule) -> finished sequences leave the scheduler, their KV blocks and
adapter holds are freed, and the outputs go out. Engines are made and started by
server/engine/bootstrap.py.

Requests are validated where they come in (the HTTP routers; the evaluation runner fits its
own); the engine checks only what it alone knows (an adapter version's virtual tokens against
the context) and asserts the rest.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from adapterserve.adapters.errors import AdapterError
from adapterserve.adapters.kinds import kind_for
from adapterserve.adapters.registry import AdapterRegistry, Entry
from adapterserve.server.config import Settings
from adapterserve.server.engine.beam import BeamGroup, BeamSearches
from adapterserve.server.engine.detokenizer import IncrementalDetokenizer
from adapterserve.server.engine.errors import (
    EngineDeadError,
    EngineFailure,
    RequestAbortedError,
)
from adapterserve.server.engine.intake import EngineIntake, RequestStream
from adapterserve.server.engine.kv_cache import BlockAllocator
from adapterserve.server.engine.output import OutputProcessor, RequestOutput
from adapterserve.server.engine.runner import ModelRunner
from adapterserve.server.engine.scheduler import Scheduler, Sequence, Status, StepPlan
from adapterserve.server.metrics import Metrics
from adapterserve.server.model.compiled import CompiledDecode
from adapterserve.server.model.llama import Transformer
from adapterserve.server.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STEP_LOG_LEN = 4096  # steps kept in Engine.step_log
DELETED_MODEL_LABEL = "(deleted adapter)"  # metrics label of requests that outlive their adapter
FATAL_MESSAGE = "internal engine error; the server is restarting"  # no internals to clients


class Engine(EngineIntake):
    """The step loop (its asyncio side, `EngineIntake`, is in server/engine/intake.py)."""

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
            max_request_share=settings.max_request_share,
        )
        self.runner = ModelRunner(
            model,
            settings,
            max_model_len,
            num_blocks,
            registry.pool.num_slots if registry is not None else 1,
        )
        self.output = OutputProcessor(tokenizer, max_model_len)
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
        self._bind_candidates()
        plan = self.scheduler.schedule()
        self._count_admissions(plan)
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
    def _bind_candidates(self) -> None:
        """Before a plan: each waiting sequence the scheduler may admit gets its held adapter
        version's slot, bound by its kind (adapters.kinds), virtual tokens included. One whose
        version is still loading stays unbound (it waits in place); one that cannot be served
        (AdapterError) ends here."""
        for seq in self.scheduler.candidates():
            if seq.bound or seq.status is Status.FINISHED:
                continue
            try:
                lease = self.registry.acquire(seq.entry)
            except AdapterError as e:
                self._finish(seq, "error", e)
                continue
            if lease is not None:
                seq.lease = lease
                seq.cache_identity = f"adapter:{lease.entry.version}"  # versions are never reused
                kind = kind_for(lease.kind)
                seq.bind(kind.bind(self.registry.pool, lease.slot, lease.entry.num_virtual_tokens))

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
