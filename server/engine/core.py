"""The engine core process: `python -P -m adapterserve.server.engine.core FD`, started by
server/engine/process.py's EngineProcessClient, which owns the other end of the socket FD.

It reads ("config", settings, plan, log level), builds and runs the engine (bootstrap's
running_engine: the step loop on its own thread), says "started", then serves the client's
commands on its event loop:
- ("add", call, requests, model, grammar) / ("beam", call, searches, model): submit; answer
  ("accepted", call) or ("refused", call, error);
- ("abort", request ids); ("admin", call, method, args): an adapter registry change, answered
  ("admin", call, ("ok", AdapterState) | ("error", AdapterError));
- ("report",): a report now (the front end's /metrics);
- ("stop",): the engine stops (requests still in it end with "abort") and the process exits.
Upward: ("outputs", [(request id, RequestOutput), ...]) once per step, a ("report", adapters,
metrics text, ready, warming) every REPORT_INTERVAL_S (the heartbeat), and ("fatal", reason)
before it exits on a fatal engine fault (exit status FATAL_EXIT).

The core ignores SIGINT and SIGTERM: the front end drains and then says stop. It dies with its
parent (PR_SET_PDEATHSIG), and exits when the socket closes.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from adapterserve.adapters.errors import AdapterError
from adapterserve.server.engine.bootstrap import running_engine
from adapterserve.server.engine.engine import Engine
from adapterserve.server.engine.errors import EngineError
from adapterserve.server.engine.intake import RequestStream
from adapterserve.server.engine.output import RequestOutput
from adapterserve.server.engine.process import REPORT_INTERVAL_S, encode, read_frame, stream_pair
from adapterserve.server.engine.remote import AdapterState
from adapterserve.server.metrics import Metrics

log = logging.getLogger("adapterserve.core")

FATAL_EXIT = 70  # EX_SOFTWARE: the engine hit a fatal fault
PR_SET_PDEATHSIG = 1


class Core:
    def __init__(self, engine: Engine, metrics: Metrics, writer: asyncio.StreamWriter) -> None:
        self.engine, self.metrics, self.writer = engine, metrics, writer
        self.registry = engine.registry
        self.streams: dict[str, RequestStream] = {}
        self._pending: list[tuple[str, RequestOutput]] = []
        self._loop = asyncio.get_running_loop()
        self._flush_soon = False
        self.stopped = asyncio.Event()
        self.warming: asyncio.Future[None] | None = None  # the grammar matchers' warm-up

    def send(self, message: tuple) -> None:
        self.writer.write(encode(message))

    # ---- outputs: one frame per step --------------------------------------------------------
    def _collect(self, request_id: str, output: RequestOutput) -> None:
        """A stream's deliver: the engine hands a step's outputs over in one callback
        (Engine._flush_outbox), so one flush after it sends them all in one frame."""
        self._pending.append((request_id, output))
        if output.finished:
            self.streams.pop(request_id, None)
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        pending, self._pending = self._pending, []
        if pending:
            self.send(("outputs", pending))

    def _adopt(self, streams: list[RequestStream]) -> None:
        for stream in streams:
            self.streams[stream.request_id] = stream
            stream.deliver = lambda out, rid=stream.request_id: self._collect(rid, out)

    # ---- commands ---------------------------------------------------------------------------
    async def serve(self, reader: asyncio.StreamReader) -> None:
        reporter = asyncio.ensure_future(self._report_loop())
        try:
            while not self.stopped.is_set():
                message = await read_frame(reader)
                kind = message[0]
                if kind == "add":
                    await self._add(*message[1:])
                elif kind == "beam":
                    self._beam(*message[1:])
                elif kind == "abort":
                    for request_id in message[1]:
                        stream = self.streams.pop(request_id, None)
                        if stream is not None:
                            stream.abort()
                elif kind == "admin":
                    asyncio.ensure_future(self._admin(*message[1:]))
                elif kind == "report":  # the front end's /metrics wants it fresh
                    self.report()
                elif kind == "stop":
                    self.stopped.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("the front end went away; the engine core stops")
        finally:
            reporter.cancel()

    async def _add(self, call_id: int, requests: list, model: str, grammar: str | None) -> None:
        try:
            if grammar is not None:  # checked in the front end's sandbox; built off this loop
                constraints = await self.engine.grammars.constraints_async(grammar, len(requests))
                requests = [
                    (ids, dataclasses.replace(params, constraint=c), rid)
                    for (ids, params, rid), c in zip(requests, constraints, strict=True)
                ]
            streams = self.engine.add_requests(requests, model=model)
        except (EngineError, AdapterError) as exc:
            self.send(("refused", call_id, exc))
            return
        self._adopt(streams)
        self.send(("accepted", call_id))

    def _beam(self, call_id: int, searches: list, model: str) -> None:
        try:
            groups = self.engine.add_beam_searches(searches, model=model)
        except (EngineError, AdapterError) as exc:
            self.send(("refused", call_id, exc))
            return
        self._adopt([stream for streams in groups for stream in streams])
        self.send(("accepted", call_id))

    async def _admin(self, call_id: int, method: str, args: tuple) -> None:
        registry = self.registry

        def work() -> AdapterState:
            if method == "add_upload":
                staging, name, replace = args
                return AdapterState.of(registry.add_upload(Path(staging), name, replace))
            if method == "add_path":
                name, path, replace, require_root = args
                return AdapterState.of(
                    registry.add_path(name, Path(path), replace=replace, require_root=require_root)
                )
            if method == "remove":
                return AdapterState.of(registry.remove(args[0]))
            raise ValueError(f"unknown admin method {method!r}")

        try:
            result: tuple[str, Any] = ("ok", await asyncio.to_thread(work))
        except AdapterError as exc:
            result = ("error", exc)
        self.send(("admin", call_id, result))
        self.report()  # the catalog changed: the front end's view follows at once

    # ---- reports ----------------------------------------------------------------------------
    def report(self) -> None:
        states = [AdapterState.of(e) for e in self.registry.list()] if self.registry else []
        self.send(
            (
                "report",
                states,
                self.metrics.render().decode(),
                self.engine.ready,
                self.engine.warming,
            )
        )

    async def _report_loop(self) -> None:
        while True:
            try:
                self.report()
            except Exception:  # noqa: BLE001 - the next one may work; a silent core is killed
                log.warning("engine core report failed", exc_info=True)
            await asyncio.sleep(REPORT_INTERVAL_S)


async def run_core(sock: socket.socket) -> int:
    reader, writer = await stream_pair(sock)
    _, settings, plan, level = await read_frame(reader)
    logging.getLogger().setLevel(level)
    metrics = Metrics()
    fatal: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    try:
        async with running_engine(settings, metrics, plan) as engine:
            loop = asyncio.get_running_loop()
            engine.on_fatal = lambda exc: loop.call_soon_threadsafe(
                lambda: fatal.done() or fatal.set_result(exc)
            )
            core = Core(engine, metrics, writer)
            core.report()  # first: ready (nothing to warm up) before the front end says so
            core.send(("started",))
            serving = asyncio.ensure_future(core.serve(reader))
            if settings.warm_grammars:  # its matchers' tokenizer (the sandbox is the front's)
                core.warming = asyncio.ensure_future(
                    asyncio.to_thread(engine.grammars.warm, compile=False)
                )
            await asyncio.wait({serving, fatal}, return_when=asyncio.FIRST_COMPLETED)
            if fatal.done():
                core._flush()  # the engine already failed every request: say so first
                core.send(("fatal", repr(fatal.result())))
                await writer.drain()
                return FATAL_EXIT
            serving.result()
    except Exception as exc:  # noqa: BLE001 - a start failure goes to the front end
        with_reason = exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}")
        writer.write(encode(("failed", with_reason)))
        await writer.drain()
        return 1
    await writer.drain()
    return 0


def _picklable(exc: BaseException) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001
        return False
    return True


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux), and stop now if it already has."""
    expected = int(os.environ.get("ADAPTERSERVE_CORE_PARENT", "0"))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected and os.getppid() != expected:
        os._exit(1)


def main() -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end drains, then says stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [core] %(name)s: %(message)s",
    )
    sock = socket.socket(fileno=int(sys.argv[1]))
    code = asyncio.run(run_core(sock))
    sys.stdout.flush()
    os._exit(code)  # no interpreter teardown: torch's threads, the engine thread


if __name__ == "__main__":
    main()
