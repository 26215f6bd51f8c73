"""EngineReplica: the engine deployment. Each replica runs one Engine (the base model and its
own adapter pool, server/engine/bootstrap.py) and answers the ingress's ClusterEngine.

Requests arrive through a DeploymentHandle; adapter requests carry the adapter's name as
their multiplexed model id, so Ray Serve sends them to replicas that reported it as loaded
(`_resident`, an LRU of adapter_slots + host_adapter_cache names: what the replica holds in
its device slots and host tier). The
adapter state is the durable store every replica reads: before an adapter request is taken,
the replica adopts the store's current state of that adapter (one stat; a read when another
replica uploaded, replaced or deleted it), so a change is served everywhere once it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter
from ray import serve

from adapterserve.adapters.errors import AdapterError
from adapterserve.server.cluster.reports import (
    REPORT_INTERVAL_S,
    AdapterState,
    Report,
    remove_report,
    write_report,
)
from adapterserve.server.config import Settings
from adapterserve.server.engine.bootstrap import running_engine
from adapterserve.server.engine.engine import Engine
from adapterserve.server.engine.errors import EngineError
from adapterserve.server.engine.intake import RequestStream
from adapterserve.server.engine.output import RequestOutput
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.metrics import Metrics

log = logging.getLogger(__name__)

SYNC_EVERY = 4  # reports between two scans of the whole store
Item = tuple[str, Any]  # ("accepted", None) | ("refused", error) | ("outputs", [(i, output)])


class _Resident:
    """What Ray Serve's multiplexing caches per adapter name: only the name (the weights live
    in the registry's tiers, which have their own LRU of the same size)."""

    def __init__(self, name: str) -> None:
        self.name = name


class EngineReplica:
    async def __init__(self, settings: Settings) -> None:
        torch.set_num_threads(max(1, int(settings.replica_num_cpus)))
        self.settings = settings
        self.replica = serve.get_replica_context().replica_tag
        self.metrics = Metrics()
        self.routing = Counter(
            "adapterserve_cluster_routing",
            "Adapter requests that reached this replica, by "
            "whether their adapter was already in one of its device slots (hit) or not (miss)",
            ["result"],
            registry=self.metrics.registry,
        )
        self._stack = contextlib.AsyncExitStack()
        self.engine: Engine = await self._stack.enter_async_context(
            running_engine(settings, self.metrics)
        )
        # Ray Serve routes to a replica once __init__ returns: not while its compiled decode
        # step is still warming up (the engine turns ready after that, engine.run).
        await self.engine.until_ready()
        self.registry = self.engine.registry
        assert self.registry is not None, "an engine replica always has a registry"

        async def load(name: str) -> _Resident:
            return _Resident(name)

        # A replica claims the adapters it holds cheaply: in a device slot or parsed in host
        # memory (a host copy is a slot write, no disk read). Ray Serve sends an adapter that
        # no replica claims to one that claims the fewest, which spreads adapters evenly, and
        # keeps sending it there while the claim lasts.
        claims = settings.adapter_slots + settings.host_adapter_cache
        self._resident = serve.multiplexed(max_num_models_per_replica=claims)(load)
        self._reporter = asyncio.ensure_future(self._report_loop())
        log.info(
            "engine replica %s (pid %d) serving %s", self.replica, os.getpid(), self.engine.model_id
        )

    # ---- requests --------------------------------------------------------------------------
    async def generate(
        self,
        requests: list[tuple[list[int], SamplingParams, str]],
        model: str,
        grammar: str | None = None,
    ) -> AsyncIterator[Item]:
        """Streams ("accepted", None) or ("refused", error), then ("outputs", [(position,
        output), ...]) until every request finished. Cancelling the call aborts them."""
        try:
            await self._prepare(model)
            if grammar is not None:  # checked in the ingress's sandbox; built off the event loop
                constraints = await self.engine.grammars.constraints_async(grammar, len(requests))
                requests = [
                    (ids, dataclasses.replace(params, constraint=c), rid)
                    for (ids, params, rid), c in zip(requests, constraints, strict=True)
                ]
            streams = self.engine.add_requests(requests, model=model)
        except (EngineError, AdapterError) as exc:
            yield "refused", exc
            return
        yield "accepted", None
        async for batch in _merged(streams):
            yield "outputs", batch

    async def beam_search(
        self, searches: list[tuple[list[int], SamplingParams, list[str]]], model: str
    ) -> AsyncIterator[Item]:
        """As `generate`, for Engine.add_beam_searches; positions run over every answer stream
        of every search, in order."""
        try:
            await self._prepare(model)
            groups = self.engine.add_beam_searches(searches, model=model)
        except (EngineError, AdapterError) as exc:
            yield "refused", exc
            return
        yield "accepted", None
        async for batch in _merged([stream for streams in groups for stream in streams]):
            yield "outputs", batch

    async def _prepare(self, model: str) -> None:
        """Adopt the store's state of the adapter, count the routing hit or miss, and tell Ray
        Serve that this replica holds it now."""
        if model == self.engine.model_id:
            return
        if self.registry.store_changed(model):
            await asyncio.to_thread(self.registry.sync_stored, model)
        if self.registry.exists(model):
            resident = self.registry.get(model).tier == "device"
            self.routing.labels("hit" if resident else "miss").inc()
        if serve.get_multiplexed_model_id() == model:
            await self._resident(model)

    # ---- adapters (any replica; the store is shared) ---------------------------------------
    async def install_upload(self, staging: str, name: str, replace: bool) -> Item:
        """Validate the ingress's staged upload, commit it to the store and serve it here."""

        def work() -> AdapterState:
            self.registry.sync_stored(name)  # what another replica did to `name` first
            return AdapterState.of(self.registry.add_upload(Path(staging), name, replace))

        return await _answer(work)

    async def remove_adapter(self, name: str) -> Item:
        """Delete an upload from the store (or stop serving a path adapter here)."""

        def work() -> AdapterState:
            self.registry.sync_stored(name)
            return AdapterState.of(self.registry.remove(name))

        return await _answer(work)

    # ---- state -------------------------------------------------------------------------------
    def report(self) -> Report:
        return Report(
            replica=self.replica,
            pid=os.getpid(),
            time=time.time(),
            healthy=self.engine.healthy,
            adapters=[AdapterState.of(e) for e in self.registry.list()],
            metrics=self.metrics.render().decode(),
        )

    async def _report_loop(self) -> None:
        """A report every REPORT_INTERVAL_S; every SYNC_EVERY-th one first adopts every store
        change (requests adopt their own adapter's at once; this keeps the views current)."""
        state_dir = self.settings.cluster_state_dir
        for tick in itertools.count():
            try:
                if tick % SYNC_EVERY == 0:
                    await asyncio.to_thread(self.registry.sync_store)
                write_report(state_dir, self.report())
            except Exception:  # noqa: BLE001 - a report is best effort; the next one may work
                log.warning("replica report failed", exc_info=True)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine died is replaced."""
        if not self.engine.healthy:
            raise RuntimeError("the engine is not running")

    async def __del__(self) -> None:
        self._reporter.cancel()
        remove_report(self.settings.cluster_state_dir, self.replica)
        await self._stack.aclose()


async def _answer(work: Any) -> Item:
    """Run blocking registry work on a thread; an AdapterError is answered, not raised (Ray
    would wrap it with this process's traceback)."""
    try:
        return "ok", await asyncio.to_thread(work)
    except AdapterError as exc:
        return "error", exc


async def _merged(streams: list[RequestStream]) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
    """The streams' outputs as batches of (position, output): everything that arrived while
    the previous batch was sent (one Ray message per batch, not per token). Leaving early
    (the call was cancelled: the client went away) aborts every stream."""
    queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

    async def pump(position: int, stream: RequestStream) -> None:
        async for output in stream:
            queue.put_nowait((position, output))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            remaining -= sum(output.finished for _, output in batch)
            yield batch
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()
