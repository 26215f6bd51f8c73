"""The engine core in its own process, and the client the front end serves through.

    front end (this process)                      engine core (child process)
    HTTP, guards, validation, tokenization,       scheduler, model runner, adapter pool,
    grammar sandbox, SSE framing,      <------>   sampling, detokenization, stop rules
    EngineProcessClient                socketpair (server/engine/core.py)

- The core is a child started with `python -P -m adapterserve.server.engine.core FD`; it owns
  the device, its torch threads and the step loop; the front end keeps no torch work at all,
  so neither side waits for the other's GIL.
- IPC: one local socketpair (made here, so nothing else can connect), length-prefixed pickle
  frames of our own dataclasses. Commands go down one per call (a call is one HTTP request's
  choices); outputs come up in one frame per engine step for every request of that step,
  never one per token per request. A report (adapter catalog, Prometheus text, readiness) comes
  every REPORT_INTERVAL_S and doubles as the heartbeat.
- Faults: when the core dies (a signal, an exit, or no frame for `engine_heartbeat_timeout_s`,
  then SIGKILL), every request in flight ends with EngineRestartingError (503
  `engine_restarting` + Retry-After; a stream's error event), the cause is logged (the signal,
  the core's last error), a new core starts and `/ready` says no until it is up. Adapters come
  back from the durable store; evaluation jobs run their unfinished examples again. More than
  `engine_max_restarts` deaths within RESTART_WINDOW_S: no more restarts, the client turns
  unhealthy and the server exits (server/main.py's watchdog).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from adapterserve.adapters.store import AdapterStore
from adapterserve.server.config import Settings
from adapterserve.server.engine.bootstrap import EnginePlan, eos_ids, plan_engine
from adapterserve.server.engine.constraint import Grammars, sandbox_limits
from adapterserve.server.engine.errors import (
    EngineDeadError,
    EngineRestartingError,
)
from adapterserve.server.engine.intake import OutputStream
from adapterserve.server.engine.output import RequestOutput
from adapterserve.server.engine.remote import (
    AdapterState,
    ModelFacts,
    RemoteEntry,
    RemoteGrammars,
    RemoteRegistry,
    for_remote,
)
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.metrics import Metrics, merge_expositions
from adapterserve.server.model.llama import ModelArgs
from adapterserve.server.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.5  # the core's report (and heartbeat) period
RESTART_WINDOW_S = 60.0  # more than engine_max_restarts deaths in this window: give up
ADMIN_CALL_TIMEOUT_S = 300.0
METRICS_WAIT_S = 2.0  # /metrics waits this long at most for the core's fresh report
HEADER = 4  # bytes of a frame's length
MAX_FRAME = 2**31


# ---------------------------------------------------------------- frames


def encode(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(data) < MAX_FRAME, "a frame over 2 GiB"
    return len(data).to_bytes(HEADER, "little") + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """One message from the other process (ours: the socketpair is private to the two)."""
    size = int.from_bytes(await reader.readexactly(HEADER), "little")
    return pickle.loads(await reader.readexactly(size))


async def stream_pair(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(sock=sock, limit=2**20)


# ---------------------------------------------------------------- the client


class CoreStream(OutputStream):
    """One request's outputs, delivered by the client's reader; aborting it tells the core."""

    def __init__(self, request_id: str, client: EngineProcessClient) -> None:
        super().__init__(request_id)
        self._client = client
        self.refusal: BaseException | None = None  # the core refused the call

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._client.abort(self.request_id)


class ProcessRegistry(RemoteRegistry):
    """The core's adapter catalog, from its latest report; writes run in the core."""

    def __init__(self, client: EngineProcessClient, store: AdapterStore, roots: tuple) -> None:
        super().__init__(store, roots)
        self.client = client

    def _states(self) -> dict[str, RemoteEntry]:
        return {state.name: RemoteEntry.of(state) for state in self.client.adapter_states}

    def _admin(self, method: str, *args: Any) -> AdapterState:
        state = self.client.admin_call(method, *args)
        if method == "add_path":  # loaded again into a new core after a restart
            name, path, _, require_root = args
            self.client.path_loads[name] = (path, require_root)
        else:  # an upload of that name replaced it, or it was removed
            self.client.path_loads.pop(args[1] if method == "add_upload" else args[0], None)
        return state


class ProcessMetrics(Metrics):
    """This process's metrics (requests refused here, evaluation jobs, engine restarts) and
    the core's latest (engine, adapters, requests served) as one exposition: a series both
    have is summed (the front end's gauges of the engine stay 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.core_text = ""

    def render(self) -> bytes:
        return merge_expositions(super().render().decode(), self.core_text).encode()


class EngineProcessClient:
    """The EngineClient (server/engine/client.py) of an engine core in a child process: starts
    it, restarts it when it dies, and forwards requests, aborts and adapter changes to it."""

    def __init__(self, settings: Settings, plan: EnginePlan, metrics: Metrics) -> None:
        self.settings, self.plan, self.metrics = settings, plan, metrics
        self.model_id, self.max_model_len = plan.model_id, plan.max_model_len
        self.tokenizer = Tokenizer(plan.model_dir, eos_token_ids=eos_ids(plan.config))
        args = ModelArgs.from_hf_config(plan.config)
        self.model = ModelFacts(args, plan.quantization)
        self.grammars = RemoteGrammars(
            Grammars(self.tokenizer.hf, args.vocab_size, sandbox_limits(settings))
        )
        store = AdapterStore(
            settings.adapter_store, settings.max_upload_bytes, settings.max_adapters
        )
        roots = tuple([*settings.adapter_dirs, *settings.adapter_roots])
        self.registry = ProcessRegistry(self, store, roots)
        self.on_fatal: Callable[[BaseException], None] | None = None
        self.adapter_states: list[AdapterState] = []
        self.restarts = 0
        self._healthy = True
        self._core_ready = False  # the running core said it is ready
        self._warming = False
        self._stopping = False
        self._proc: subprocess.Popen | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._streams: dict[str, CoreStream] = {}
        self._calls: dict[int, tuple[asyncio.Future, list[CoreStream]]] = {}
        self._admin: dict[int, asyncio.Future] = {}
        self._report_waiters: list[asyncio.Future] = []
        # adapters loaded by path (load_lora_adapter): name -> (path, require_root), loaded
        # again into a new core before it is ready
        self.path_loads: dict[str, tuple[str, bool]] = {}
        self._replaying = False
        self._replay_task: asyncio.Task | None = None
        self._core_says_ready = False
        self._ids = itertools.count(1)
        self._deaths: deque[float] = deque()
        self._last_frame = time.monotonic()
        self._last_error: str | None = None
        self._up = asyncio.Event()  # a core is running and ready
        self._loop = asyncio.get_running_loop()
        self._supervisor: asyncio.Task | None = None

    # ---- state --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    @property
    def capacity(self) -> int:
        return self.settings.max_num_seqs + self.settings.max_queue_len

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def ready(self) -> bool:
        return self._healthy and self._core_ready and not self._stopping

    @property
    def warming(self) -> bool:
        return self._warming

    @property
    def restarting(self) -> bool:
        """The core died and a new one is starting."""
        return self._healthy and self.restarts > 0 and not self._core_ready and not self._stopping

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    async def until_ready(self, poll_s: float = 0.05) -> None:
        while not self.ready and self._healthy and not self._stopping:
            await asyncio.sleep(poll_s)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        model: str | None = None,
        request_id: str | None = None,
    ) -> CoreStream:
        return self.add_requests([(prompt_token_ids, params, request_id)], model)[0]

    def add_requests(
        self,
        requests: list[tuple[list[int], SamplingParams, str | None]],
        model: str | None = None,
    ) -> list[CoreStream]:
        """Submit one call's requests (all or none, as Engine.add_requests); the core's
        refusal is raised by `confirm` (and ends the streams)."""
        plain, grammar = for_remote(requests)
        return self._submit(
            ("add", plain, model or self.model_id, grammar), [rid for _, _, rid in plain]
        )

    def add_beam_searches(
        self,
        requests: list[tuple[list[int], SamplingParams, list[str]]],
        model: str | None = None,
    ) -> list[list[CoreStream]]:
        searches = [(list(ids), params, list(rids)) for ids, params, rids in requests]
        streams = iter(
            self._submit(
                ("beam", searches, model or self.model_id),
                [rid for _, _, rids in searches for rid in rids],
            )
        )
        return [[next(streams) for _ in rids] for _, _, rids in searches]

    def _submit(self, command: tuple, request_ids: list[str]) -> list[CoreStream]:
        if not self._healthy or self._stopping:
            raise EngineDeadError("the engine is not running")
        if self._writer is None or not self._core_ready:
            raise EngineRestartingError("the engine is restarting")
        call_id = next(self._ids)
        streams = [CoreStream(rid, self) for rid in request_ids]
        accepted = self._loop.create_future()
        self._calls[call_id] = (accepted, streams)
        for stream in streams:
            self._streams[stream.request_id] = stream
        self._send((command[0], call_id, *command[1:]))
        return streams

    async def confirm(self, streams: list[CoreStream]) -> None:
        """Wait for the core's acceptance; its refusal is raised here."""
        futures = {
            id(f): f for f, members in self._calls.values() if any(s in members for s in streams)
        }
        for future in futures.values():
            await asyncio.shield(future)
        for stream in streams:
            if stream.refusal is not None:
                raise stream.refusal

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None and self._writer is not None:
            self._send(("abort", [request_id]))

    def _send(self, message: tuple) -> None:
        assert self._writer is not None
        self._writer.write(encode(message))

    async def sync_metrics(self) -> None:
        """Ask the core for a report now and wait for it (briefly), so that /metrics shows
        every request answered before it."""
        if self._writer is None:
            return
        waiter = self._loop.create_future()
        self._report_waiters.append(waiter)
        self._send(("report",))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, METRICS_WAIT_S)

    # ---- adapters (worker threads) ----------------------------------------------------------
    def admin_call(self, method: str, *args: Any) -> AdapterState:
        """The core runs the registry's `method`; its AdapterError is raised here."""

        async def call() -> tuple[str, Any]:
            if not self._up.is_set():
                await asyncio.wait_for(self._up.wait(), ADMIN_CALL_TIMEOUT_S)
            return await self._admin_frame(method, args)

        kind, payload = asyncio.run_coroutine_threadsafe(call(), self._loop).result(
            ADMIN_CALL_TIMEOUT_S
        )
        if kind == "error":
            raise payload
        if kind == "lost":
            raise EngineRestartingError("the engine restarted during the change; retry it")
        return payload

    async def _admin_frame(self, method: str, args: tuple) -> tuple[str, Any]:
        if self._writer is None:
            return "lost", None
        call_id = next(self._ids)
        future = self._loop.create_future()
        self._admin[call_id] = future
        self._send(("admin", call_id, method, args))
        return await future

    async def _replay_paths(self) -> None:
        """A new core: load the adapters that were loaded by path into the old one again,
        before it says ready (a request for one of them must not meet a 404 meanwhile)."""
        try:
            for name, (path, require_root) in list(self.path_loads.items()):
                kind, payload = await self._admin_frame(
                    "add_path", (name, path, True, require_root)
                )
                if kind == "lost":
                    return
                if kind == "error":
                    log.warning(
                        "adapter %r (loaded by path) could not be loaded again after the "
                        "engine core restarted: %s",
                        name,
                        payload,
                    )
                    self.path_loads.pop(name, None)
        finally:
            self._replaying = False
            if self._core_says_ready and self._writer is not None:
                self._core_ready = True
                self._up.set()

    # ---- the core's life ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the first core; returns once it has built its engine (its compiled step may
        still be warming up: `ready` turns true after). A core that fails to start is an
        error here."""
        started = self._loop.create_future()
        self._supervisor = asyncio.ensure_future(self._supervise(started))
        await started

    async def _supervise(self, started: asyncio.Future) -> None:
        while not self._stopping:
            began = time.monotonic()
            # a new core after a restart is ready once its path adapters are back
            self._replaying = started.done() and bool(self.path_loads)
            try:
                reader = await self._spawn()
            except Exception as exc:  # noqa: BLE001 - the core did not come up
                if not started.done():
                    started.set_exception(exc)
                    return
                log.error("the engine core failed to start: %s", exc)
                reader = None
            if reader is not None:
                if not started.done():
                    started.set_result(None)
                else:
                    log.warning(
                        "engine core %d started in %.1f s (restart %d)",
                        self._proc.pid,
                        time.monotonic() - began,
                        self.restarts,
                    )
                    if self._replaying:
                        self._replay_task = asyncio.ensure_future(self._replay_paths())
                await self._serve(reader)
            if self._stopping:
                return
            await self._on_death()
            if not self._healthy:
                return

    async def _spawn(self) -> asyncio.StreamReader:
        """Start a core and wait for its "started" frame (its engine built)."""
        parent, child = socket.socketpair()
        env = {**os.environ, "ADAPTERSERVE_CORE_PARENT": str(os.getpid())}
        command = [
            sys.executable,
            "-P",
            "-m",
            "adapterserve.server.engine.core",
            str(child.fileno()),
        ]
        self._proc = subprocess.Popen(
            command, pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL
        )
        child.close()
        reader, writer = await stream_pair(parent)
        writer.write(encode(("config", self.settings, self.plan, logging.getLogger().level)))
        self._writer = writer
        self._last_frame = time.monotonic()
        try:
            while True:
                message = await read_frame(reader)
                if message[0] == "started":
                    return reader
                if message[0] == "failed":
                    raise message[1]
                self._handle(message)
        except (asyncio.IncompleteReadError, ConnectionError):
            await asyncio.to_thread(self._proc.wait)
            self._writer = None
            raise RuntimeError(
                f"the engine core exited while starting ({describe_exit(self._proc.returncode)})"
                f"{self._last_error_suffix()}"
            ) from None
        except BaseException:
            self._kill()
            self._writer = None
            raise

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        """Read the core's frames until it goes away (or misses its heartbeat)."""
        heart = asyncio.ensure_future(self._heartbeat())
        try:
            while True:
                self._handle(await read_frame(reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            heart.cancel()

    async def _heartbeat(self) -> None:
        timeout = self.settings.engine_heartbeat_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            if time.monotonic() - self._last_frame > timeout and not self._stopping:
                self._last_error = f"no heartbeat for {timeout:g} s"
                log.error("the engine core missed its heartbeat (%g s); killing it", timeout)
                self._kill()
                return

    def _handle(self, message: tuple) -> None:
        self._last_frame = time.monotonic()
        kind = message[0]
        if kind == "outputs":
            for request_id, output in message[1]:
                self._deliver(request_id, output)
        elif kind == "accepted":
            self._settle(message[1], None)
        elif kind == "refused":
            self._settle(message[1], message[2])
        elif kind == "report":
            _, states, metrics_text, ready, warming = message
            self.adapter_states = states
            self.registry.caught_up()  # the core reports right after each change it made
            if isinstance(self.metrics, ProcessMetrics):
                self.metrics.core_text = metrics_text
            self._warming = warming
            self._core_says_ready = ready
            if ready and not self._core_ready and not self._replaying:
                self._core_ready = True
                self._up.set()
            waiters, self._report_waiters = self._report_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        elif kind == "admin":
            _, call_id, result = message
            future = self._admin.pop(call_id, None)
            if future is not None and not future.done():
                future.set_result(result)
        elif kind == "fatal":
            self._last_error = message[1]
            log.error("the engine core hit a fatal fault: %s", message[1])

    def _deliver(self, request_id: str, output: RequestOutput) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return  # aborted here meanwhile
        if isinstance(output.error, EngineDeadError):  # the core's fatal fault: it restarts
            output = dataclasses.replace(
                output, error=EngineRestartingError("the engine failed and is restarting")
            )
        if output.finished:
            del self._streams[request_id]
        stream.deliver(output)

    def _settle(self, call_id: int, error: BaseException | None) -> None:
        accepted, streams = self._calls.pop(call_id, (None, []))
        if accepted is None or accepted.done():
            return
        accepted.set_result(None)
        if error is not None:
            for stream in streams:
                stream.refusal = error
                self._streams.pop(stream.request_id, None)
                stream.deliver(
                    RequestOutput(
                        stream.request_id, "", [], finished=True, finish_reason="error", error=error
                    )
                )

    async def _on_death(self) -> None:
        """The core is gone: end what it was serving, log why, and start another (or give
        up after too many deaths in a row)."""
        self._writer = None
        self._core_ready = False
        self._up.clear()
        proc = self._proc
        code = await asyncio.to_thread(proc.wait) if proc is not None else None
        cause = describe_exit(code)
        log.error(
            "the engine core (pid %s) died: %s%s; in-flight requests end with 503 "
            "engine_restarting",
            proc.pid if proc else "?",
            cause,
            self._last_error_suffix(),
        )
        self._last_error = None
        self._fail_in_flight()
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > RESTART_WINDOW_S:
            self._deaths.popleft()
        if len(self._deaths) > self.settings.engine_max_restarts:
            log.critical(
                "the engine core died %d times within %g s; not restarting it",
                len(self._deaths),
                RESTART_WINDOW_S,
            )
            self._healthy = False
            if self.on_fatal is not None:
                self.on_fatal(EngineDeadError(f"the engine core keeps dying ({cause})"))
            return
        self.restarts += 1
        self.metrics.engine_restarts.inc()
        await asyncio.sleep(min(2.0, 0.25 * len(self._deaths)))  # a little longer each time

    def _fail_in_flight(self) -> None:
        error = EngineRestartingError("the engine stopped and is restarting")
        for call_id in list(self._calls):
            self._settle(call_id, error)
        for request_id in list(self._streams):
            self._deliver(
                request_id,
                RequestOutput(
                    request_id, "", [], finished=True, finish_reason="error", error=error
                ),
            )
        for future in self._admin.values():
            if not future.done():
                future.set_result(("lost", None))
        self._admin.clear()

    def _last_error_suffix(self) -> str:
        return f" (its last error: {self._last_error})" if self._last_error else ""

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    @property
    def core_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    async def stop(self) -> None:
        """Tell the core to stop (requests still in it finish with "abort"), wait for it (up
        to the shutdown timeout, then SIGKILL)."""
        self._stopping = True
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._send(("stop",))
                await self._writer.drain()
        proc = self._proc
        if proc is not None:
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(proc.wait), self.settings.shutdown_timeout_s + 5
                )
            except TimeoutError:
                log.warning("the engine core did not stop in time; killing it")
                self._kill()
                await asyncio.to_thread(proc.wait)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
        self._fail_in_flight()
        self.grammars.close()


def describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        return f"killed by signal {-code}"
    return f"exit status {code}"


@asynccontextmanager
async def engine_process(
    settings: Settings, metrics: Metrics, plan: EnginePlan | None = None
) -> AsyncIterator[EngineProcessClient]:
    """The create_app backend (server/main.py) that serves through an engine core process."""
    plan = plan or await asyncio.to_thread(plan_engine, settings)
    client = EngineProcessClient(settings, plan, metrics)
    try:
        await client.start()
        yield client
    finally:
        await client.stop()
