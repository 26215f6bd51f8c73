"""create_app(settings): the FastAPI app factory. The lifespan builds the engine, keeps it and
its companions on `app.state`, and stops it on shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import Settings
from server.deps import require_api_key
from server.engine.engine import start_engine
from server.errors import (
    APIError,
    count_rejection,
    error_response,
    install_error_handlers,
    invalid_request,
)
from server.evaluation.runner import build_runner
from server.metrics import Metrics
from server.routers import adapters, chat, completions, health, models
from server.routers import evaluations as evaluations_router
from server.routers.openapi import openapi_document

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 64
WATCHDOG_INTERVAL_S = 1.0

FatalHandler = Callable[[BaseException], None]


def create_app(
    settings: Settings | None = None, *, on_fatal: FatalHandler | None = None
) -> FastAPI:
    """The app for `settings` (default: from ADAPTERSERVE_* env vars). `on_fatal` runs on the
    event loop once if the engine dies; the CLI uses it to shut the server down and exit 1."""
    settings = settings or Settings()
    app = FastAPI(
        title="adapterserve",
        version="0.1.0",
        lifespan=_lifespan,
        dependencies=[Depends(require_api_key)],
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.on_fatal = on_fatal
    app.state.draining = False
    install_error_handlers(app)
    for module in (completions, chat, models, adapters, health):
        app.include_router(module.router)
    app.include_router(evaluations_router.router)
    _add_docs_routes(app)
    app.add_middleware(JSONBodyGuard, max_body_bytes=settings.max_request_body_bytes)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics = Metrics()
    engine = await start_engine(settings, metrics)
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
    watchdog = asyncio.ensure_future(_watch_engine(app, fatal))
    try:
        yield
    finally:
        watchdog.cancel()
        app.state.draining = True
        await app.state.evaluations.stop()
        await engine.stop()
        if engine.registry is not None:
            engine.registry.close()


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
    """/openapi.json and /docs behind the same API key as everything else."""

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(openapi_document(app))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="adapterserve")


# ---------------------------------------------------------------- body guard


class JSONBodyGuard:
    """Checks request bodies before FastAPI parses them: size cap (413), JSON content type,
    strict UTF-8, a JSON object, nesting depth, no lone surrogates (400). Multipart bodies
    (adapter uploads) pass through: their routes apply their own limits."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        content_type = _header(scope, b"content-type").split(";")[0].strip().lower()
        if content_type.startswith("multipart/"):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
            if body:
                _check_content_type(content_type)
                _check_json(body)
        except APIError as error:
            count_rejection(scope.get("app"), scope.get("path", ""), "", error.status)
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise APIError(400, "The client disconnected while sending the body.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"The request body exceeds {self.max_body_bytes} bytes; send a smaller request.",
            code="request_too_large",
        )


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def _check_content_type(content_type: str) -> None:
    # A missing content type is read as JSON, as FastAPI does; anything else must say JSON.
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise invalid_request(
            f"Content-Type must be application/json, got {content_type[:60]!r}.",
            code="unsupported_content_type",
        )


def _check_json(body: bytes) -> None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_request(f"The body is not valid UTF-8 (byte offset {exc.start}).") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise invalid_request(
            f"JSON nested deeper than {MAX_JSON_DEPTH} levels is not accepted."
        ) from None
    except ValueError as exc:
        raise invalid_request(f"The body is not valid JSON: {str(exc)[:100]}.") from None
    if not isinstance(value, dict):
        raise invalid_request(f"The body must be a JSON object, got {type(value).__name__}.")
    _check_tree(value)


def _check_tree(value: Any) -> None:
    """Nesting depth and lone surrogates (JSON escapes like \\ud800 decode to them, and they
    cannot be encoded as UTF-8), walked iteratively."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise invalid_request(
                f"JSON nested deeper than {MAX_JSON_DEPTH} levels is not accepted."
            )
        if isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            _check_encodable(item)


def _check_encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid_request(
            f"The body contains a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}); send valid Unicode."
        ) from None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the buffered body once, then passes through (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
