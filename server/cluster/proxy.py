"""ClusterEngine: the engine the ingress's routers use, over the engine replicas.

It has the interface of server/engine/engine.py's Engine that the routers, server/api/serving.py
and the evaluation runner use (add_requests / add_beam_searches -> streams of RequestOutput,
confirm, tokenizer, model_id, max_model_len, grammars, healthy / ready, registry), so the
HTTP API is the same code in one process and in a cluster:

- requests: one DeploymentHandle call per add_requests (streaming), with the adapter's name as
  multiplexed model id (affinity on); `confirm` waits for the replica's acceptance, so that its
  refusals (404, 503 queue full, 400) are answered before a response starts. A replica that
  dies ends the requests it was running with ReplicaLostError (503 + Retry-After), never a hang.
- tokenizer, chat template, grammar compiling: here, from the same model folder.
- adapters: ClusterRegistry (server/engine/remote.py's RemoteRegistry), a view of the replicas' reports (server/cluster/reports.py) that
  forwards uploads and deletes to one replica (the store is shared).
- metrics: ClusterMetrics renders the ingress's own metrics and every fresh replica's, with a
  `replica` label.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from adapterserve.adapters.errors import AdapterError, NoAdapterRootsError
from adapterserve.adapters.store import AdapterStore
from adapterserve.server.cluster.reports import Report, read_reports
from adapterserve.server.config import Settings
from adapterserve.server.engine.bootstrap import EnginePlan, eos_ids, plan_engine
from adapterserve.server.engine.constraint import Grammars, sandbox_limits
from adapterserve.server.engine.errors import EngineError, ReplicaLostError
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
from adapterserve.server.metrics import Exposition, Metrics
from adapterserve.server.model.llama import ModelArgs
from adapterserve.server.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ADMIN_CALL_TIMEOUT_S = 300.0
RESUBMITS = 3  # a call not yet accepted by a replica is issued again this often
RESUBMIT_DELAY_S = 0.5
REPORTS_CACHE_S = 0.2  # reports are read at most this often


# ---------------------------------------------------------------- requests


class ProxyStream(OutputStream):
    """One request's outputs, as RequestStream: async iterator, abort()."""

    def __init__(self, call: RemoteCall, request_id: str) -> None:
        super().__init__(request_id)
        self._call = call

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._call.abandon(self)


class RemoteCall:
    """One streaming call to a replica (EngineReplica.generate / beam_search) and the streams
    it feeds: a pump task reads the replica's items and hands each output to its stream. A
    call that fails before the replica accepted it (a dead replica Ray had not yet noticed)
    is issued again, up to RESUBMITS times: nothing of it ran."""

    def __init__(self, issue: Callable[[], Any], request_ids: list[str]) -> None:
        self._issue = issue
        self.response = issue()
        self.streams = [ProxyStream(self, request_id) for request_id in request_ids]
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._open = {id(s) for s in self.streams}  # not finished, not abandoned
        self._delivered: set[int] = set()  # positions whose final output arrived
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        for attempt in range(RESUBMITS + 1):
            try:
                await self._read()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Ray's actor / task errors: replica gone
                log.warning("engine replica call failed: %r", exc)
                if self.accepted.done() or attempt == RESUBMITS:
                    self._lose(ReplicaLostError("the replica serving the request went away"))
                    return
            await asyncio.sleep(RESUBMIT_DELAY_S * (attempt + 1))
            self.response = self._issue()

    async def _read(self) -> None:
        async for kind, payload in self.response:
            if kind == "accepted":
                self.accepted.set_result(None)
            elif kind == "refused":
                self._fail(payload)
                return
            else:
                for position, output in payload:
                    if output.finished:
                        self._delivered.add(position)
                    self.streams[position].deliver(output)
        if len(self._delivered) < len(self.streams):
            self._lose(ReplicaLostError("the replica ended the call early"))

    def _lose(self, error: EngineError) -> None:
        if not self.accepted.done():
            self._fail(error)
            return
        for position, stream in enumerate(self.streams):
            if position not in self._delivered:
                stream.deliver(
                    RequestOutput(
                        stream.request_id, "", [], finished=True, finish_reason="error", error=error
                    )
                )

    def _fail(self, error: Exception) -> None:
        """Refused (or lost) before acceptance: `confirm` raises the error, and a stream read
        without confirm ends with it instead of waiting forever."""
        self.accepted.set_exception(error)
        self.accepted.exception()  # retrieved: no "never retrieved" warning without confirm
        for stream in self.streams:
            stream.deliver(
                RequestOutput(
                    stream.request_id, "", [], finished=True, finish_reason="error", error=error
                )
            )

    def abandon(self, stream: ProxyStream) -> None:
        """A stream was aborted; once all are finished or aborted, cancel the call (the
        replica's generator then aborts its engine requests)."""
        self._open.discard(id(stream))
        if not any(id(s) in self._open and not s.finished for s in self.streams):
            self.close()

    def close(self) -> None:
        if not self.task.done():
            self.task.cancel()
            with contextlib.suppress(Exception):
                self.response.cancel()


class ClusterRegistry(RemoteRegistry):
    """The adapters of the whole cluster: the replicas' reports merged (the newest version of
    each name, its tier on each replica). Uploads are committed and deletes made by one
    replica (the store is shared); loading by path (vLLM's load_lora_adapter) is refused: a
    path is one machine's."""

    clustered = True

    def __init__(self, engine: ClusterEngine, store: AdapterStore) -> None:
        super().__init__(store)
        self.engine = engine

    def _states(self) -> dict[str, RemoteEntry]:
        by_name: dict[str, list[tuple[str, AdapterState]]] = {}
        for report in self.engine.reports():
            for state in report.adapters:
                by_name.setdefault(state.name, []).append((report.replica, state))
        view = {}
        for name, held in by_name.items():
            newest = max(held, key=lambda item: item[1].version)[1]
            view[name] = RemoteEntry.of(newest, {replica: s.tier for replica, s in held})
        return view

    def _admin(self, method: str, *args: Any) -> AdapterState:
        replica_method = {"add_upload": "install_upload", "remove": "remove_adapter"}[method]
        return self.engine.admin_call(replica_method, *args)

    def add_path(
        self, name: str, path: Path, replace: bool = False, require_root: bool = True
    ) -> RemoteEntry:
        raise NoAdapterRootsError(
            "lora_path",
            "loading by path is not available on a cluster; upload the adapter to "
            "POST /v1/adapters (every replica reads the shared store)",
        )


# ---------------------------------------------------------------- metrics


# What the ingress itself counts; the rest of its Metrics (engine gauges, histograms) stays
# empty there, and only the replicas' series of those are shown.
INGRESS_FAMILIES = (
    "adapterserve_requests_total",
    "adapterserve_requests_created",
    "adapterserve_evaluation_",
)


class ClusterMetrics(Metrics):
    """The ingress's metrics (requests refused here, evaluation jobs) and every fresh
    replica's engine metrics with a `replica` label, as one Prometheus exposition."""

    def __init__(self) -> None:
        super().__init__()
        self.engine: ClusterEngine | None = None

    def render(self) -> bytes:
        merged = Exposition()
        merged.add(super().render().decode(), only=INGRESS_FAMILIES)
        for report in self.engine.reports() if self.engine is not None else ():
            merged.add(report.metrics, report.replica)
        return merged.render().encode()


# ---------------------------------------------------------------- the engine proxy


class ClusterEngine:
    def __init__(self, settings: Settings, plan: EnginePlan, handle: Any, metrics: Metrics) -> None:
        self.settings, self.metrics, self.handle = settings, metrics, handle
        self.model_id, self.max_model_len = plan.model_id, plan.max_model_len
        self.tokenizer = Tokenizer(plan.model_dir, eos_token_ids=eos_ids(plan.config))
        args = ModelArgs.from_hf_config(plan.config)
        self.model = ModelFacts(args, plan.quantization)
        self.grammars = RemoteGrammars(
            Grammars(self.tokenizer.hf, args.vocab_size, sandbox_limits(settings))
        )
        self.healthy = True  # the ingress itself; Ray Serve restarts engine replicas
        self.warming = self.restarting = False  # Ray Serve routes to ready replicas only
        self.on_fatal = None
        self._draining = False
        self.registry = ClusterRegistry(
            self,
            AdapterStore(settings.adapter_store, settings.max_upload_bytes, settings.max_adapters),
        )
        self._loop = asyncio.get_running_loop()
        self._reports: tuple[float, list[Report]] = (0.0, [])
        self._calls: set[RemoteCall] = set()

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    @property
    def capacity(self) -> int:
        return self.settings.max_num_seqs + self.settings.max_queue_len

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    # ---- requests --------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        model: str | None = None,
        request_id: str | None = None,
    ) -> ProxyStream:
        return self.add_requests([(prompt_token_ids, params, request_id)], model)[0]

    def add_requests(
        self,
        requests: list[tuple[list[int], SamplingParams, str | None]],
        model: str | None = None,
    ) -> list[ProxyStream]:
        model = model or self.model_id
        plain, grammar = for_remote(requests)
        handle = self._handle_for(model)
        call = self._start(
            lambda: handle.generate.remote(plain, model, grammar), [rid for _, _, rid in plain]
        )
        return call.streams

    def add_beam_searches(
        self,
        requests: list[tuple[list[int], SamplingParams, list[str]]],
        model: str | None = None,
    ) -> list[list[ProxyStream]]:
        model = model or self.model_id
        handle = self._handle_for(model)
        call = self._start(
            lambda: handle.beam_search.remote(requests, model),
            [rid for _, _, ids in requests for rid in ids],
        )
        streams = iter(call.streams)
        return [[next(streams) for _ in ids] for _, _, ids in requests]

    async def confirm(self, streams: list[ProxyStream]) -> None:
        """Wait for the replicas' acceptance; their refusal (or loss) is raised here."""
        for call in {id(s._call): s._call for s in streams}.values():
            await asyncio.shield(call.accepted)

    def _handle_for(self, model: str) -> Any:
        handle = self.handle.options(stream=True)
        if self.settings.cluster_affinity and model != self.model_id:
            handle = handle.options(multiplexed_model_id=model)
        return handle

    def _start(self, issue: Callable[[], Any], request_ids: list[str]) -> RemoteCall:
        call = RemoteCall(issue, request_ids)
        self._calls.add(call)
        call.task.add_done_callback(lambda _: self._calls.discard(call))
        return call

    # ---- adapters and state -----------------------------------------------------------------
    def admin_call(self, method: str, *args: Any) -> AdapterState:
        """(worker thread) One replica runs `method`; its AdapterError is raised here."""

        async def call() -> tuple[str, Any]:
            return await getattr(self.handle, method).remote(*args)

        future = asyncio.run_coroutine_threadsafe(call(), self._loop)
        kind, payload = future.result(ADMIN_CALL_TIMEOUT_S)
        if kind == "error":
            assert isinstance(payload, AdapterError)
            raise payload
        return payload

    def reports(self) -> list[Report]:
        """The fresh replica reports (read at most every REPORTS_CACHE_S)."""
        read_at, reports = self._reports
        if time.monotonic() - read_at > REPORTS_CACHE_S:
            reports = read_reports(self.settings.cluster_state_dir)
            self._reports = (time.monotonic(), reports)
        return reports

    @property
    def ready(self) -> bool:
        """Not draining, and some engine replica reported lately (/ready, and new requests
        get 503 + Retry-After while none is up)."""
        return not self._draining and bool(self.reports())

    async def sync_metrics(self) -> None:
        """EngineClient: ClusterMetrics reads the replicas' reports when it renders."""

    async def until_ready(self, poll_s: float = 0.05) -> None:
        while not self.ready and not self._draining:
            await asyncio.sleep(poll_s)

    async def stop(self) -> None:
        self._draining = True
        for call in list(self._calls):
            call.close()
        self.grammars.close()


def cluster_backend(handle: Any) -> Any:
    """The create_app backend (server/main.py) that serves through the engine replicas."""

    @asynccontextmanager
    async def backend(
        settings: Settings, metrics: Metrics, plan: EnginePlan | None
    ) -> AsyncIterator[ClusterEngine]:
        plan = plan or await asyncio.to_thread(plan_engine, settings)
        engine = ClusterEngine(settings, plan, handle, metrics)
        if isinstance(metrics, ClusterMetrics):
            metrics.engine = engine
        try:
            yield engine
        finally:
            await engine.stop()

    return backend
