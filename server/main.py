"""create_app(settings): the FastAPI app factory. The lifespan starts the engine (from the
CLI's plan when it made one; server/engine/bootstrap.py), keeps it and its companions on
`app.state`, and stops it on shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from adapterserve.server import console
from adapterserve.server.api.deps import require_admin_key
from adapterserve.server.api.errors import install_error_handlers
from adapterserve.server.api.guards import RequestGuard, body_routes, routes_depending_on
from adapterserve.server.api.routers import (
    adapters,
    chat,
    completions,
    health,
    models,
    responses,
    tokenize,
)
from adapterserve.server.api.routers import evaluations as evaluations_router
from adapterserve.server.api.routers import files as files_router
from adapterserve.server.api.routers import fine_tuning as fine_tuning_router
from adapterserve.server.api.routers.openapi import openapi_document
from adapterserve.server.config import Settings
from adapterserve.server.engine.bootstrap import EnginePlan, running_engine
from adapterserve.server.engine.process import ProcessMetrics, engine_process
from adapterserve.server.evaluation.runner import build_runner
from adapterserve.server.finetune.files import FileStore
from adapterserve.server.finetune.jobs import build_manager
from adapterserve.server.metrics import Metrics

log = logging.getLogger(__name__)

WATCHDOG_INTERVAL_S = 1.0

FatalHandler = Callable[[BaseException], None]
# What the lifespan serves through: an async context manager yielding an EngineClient
# (server/engine/client.py): running_engine (in this process), engine_process (an engine core
# process, server/engine/process.py) or the cluster's (server/cluster/proxy.py).
Backend = Callable[[Settings, Metrics, "EnginePlan | None"], AbstractAsyncContextManager[Any]]


def create_app(
    settings: Settings | None = None,
    *,
    on_fatal: FatalHandler | None = None,
    plan: EnginePlan | None = None,
    backend: Backend | None = None,
    metrics_factory: Callable[[], Metrics] | None = None,
) -> FastAPI:
    """The app for `settings` (default: from ADAPTERSERVE_* env vars). `on_fatal` runs on the
    event loop once if the engine dies; the CLI uses it to shut the server down and exit 1.
    `plan`: the engine plan the CLI already made (plan_engine), else the lifespan makes it.
    `backend`: what serves the requests (default: settings.engine_process ? engine_process, an
    engine core in a child process : running_engine, an engine on a thread of this one);
    `metrics_factory` makes the app's Metrics (a remote engine's client also renders the
    engine's)."""
    settings = settings or Settings()
    app = FastAPI(
        title="adapterserve",
        version="0.1.0",
        lifespan=_lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.on_fatal = on_fatal
    app.state.engine_plan = plan
    if backend is None:
        backend = engine_process if settings.engine_process else running_engine
        if metrics_factory is None and settings.engine_process:
            metrics_factory = ProcessMetrics
    app.state.backend = backend
    app.state.metrics_factory = metrics_factory or Metrics
    app.state.draining = False
    install_error_handlers(app)
    routers = [
        m.router
        for m in (
            completions,
            chat,
            responses,
            models,
            adapters,
            health,
            tokenize,
            evaluations_router,
            files_router,
            fine_tuning_router,
        )
    ]
    for router in routers:
        app.include_router(router)
    _add_docs_routes(app)
    app.include_router(console.build_router())  # the web console at /ui, linked from /
    every_route = [route for router in routers for route in router.routes]
    # keys (the admin key's role too), content types, body caps and stalls, before routing
    app.add_middleware(
        RequestGuard,
        settings=settings,
        routes=body_routes(every_route),
        admin_routes=routes_depending_on(every_route, require_admin_key),
    )
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics = app.state.metrics_factory()
    app.state.files = FileStore(
        settings.file_store_dir,
        settings.max_file_bytes,
        settings.max_files,
        settings.max_files_bytes,
    )  # in this process on a cluster too: the ingress serves /v1/files, no replica reads them
    async with app.state.backend(settings, metrics, app.state.engine_plan) as engine:
        app.state.metrics = metrics
        app.state.engine = engine
        app.state.registry = engine.registry
        app.state.started_at = int(time.time())
        fatal = asyncio.Event()
        loop = asyncio.get_running_loop()
        engine.on_fatal = lambda exc: loop.call_soon_threadsafe(_record_fatal, app, fatal, exc)
        log.info("serving %s (max_model_len %d)", engine.model_id, engine.max_model_len)
        app.state.evaluations = build_runner(settings, engine, metrics, app.state)
        await app.state.evaluations.start()
        app.state.fine_tuning = build_manager(settings, engine, app.state)
        await app.state.fine_tuning.start()
        watchdog = asyncio.ensure_future(_watch_engine(app, fatal))
        if settings.warm_grammars:  # a thread: the first constrained request waits on its work
            warming = asyncio.ensure_future(asyncio.to_thread(engine.grammars.warm))
        try:
            yield
        finally:  # then running_engine stops the engine and closes its registry
            watchdog.cancel()
            if settings.warm_grammars:
                await asyncio.gather(warming, return_exceptions=True)
            app.state.draining = True
            await app.state.fine_tuning.stop()
            await app.state.evaluations.stop()


def _record_fatal(app: FastAPI, fatal: asyncio.Event, exc: BaseException) -> None:
    log.critical("fatal engine fault: %r", exc)
    app.state.fatal_error = exc
    fatal.set()


async def _watch_engine(app: FastAPI, fatal: asyncio.Event) -> None:
    """Waits for a fatal fault (callback or `engine.healthy` turning False), then hands over
    to `on_fatal` once so that the process exits instead of limping on."""
    engine = app.state.engine
    while engine.healthy and not fatal.is_set():
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(fatal.wait(), WATCHDOG_INTERVAL_S)
    app.state.draining = True
    log.critical("the engine is unhealthy; shutting the server down")
    if app.state.on_fatal is not None:
        app.state.on_fatal(
            getattr(app.state, "fatal_error", None) or RuntimeError("engine unhealthy")
        )


def _add_docs_routes(app: FastAPI) -> None:
    """/openapi.json and /docs, behind the same API key as everything else (RequestGuard)."""

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(openapi_document(app))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="adapterserve")
