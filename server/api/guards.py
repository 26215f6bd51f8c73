"""RequestGuard: what every HTTP request must pass before routing, and before its body is read.

1. **API key** (401), unless the path is public (`/health`; `/ready` unless `--ready-requires-key`;
   the console's static files under `/ui` and the redirect to them at `/`, which hold no data:
   the page asks its user for the key).
   Checked before routing, so that a client without a key learns nothing about the routes (no
   404 / 405 before 401). Admin routes also need the admin key (`deps.require_admin_key`,
   checked here too, before the content type): a valid user key without that role is a 403.
2. **Content type by route**, from the headers alone: a JSON route takes `application/json`
   (or `+json`, or no content type), the adapter and file uploads take `multipart/form-data`;
   anything else is a 415 before a byte of the body is read.
3. **Size cap while reading**, for every content type: a declared Content-Length over the cap is
   refused at once, and a body that grows past it is cut off (413) without buffering the rest.
4. **Slow bodies**: a body must keep coming and must arrive in time (`BodyClock`): a body that
   sends nothing for `http_body_timeout_s`, that falls under `http_body_min_rate` bytes/s once
   `http_body_grace_s` are spent, or that is not complete within `http_body_deadline_s`, is a
   408, logged, and the connection closes (headers are timed by the protocol,
   server/api/transport.py).
5. **JSON routes**: the whole body read and checked (strict UTF-8, a JSON object, nesting depth,
   no lone surrogates; 400) before FastAPI parses it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterserve.server.api.errors import (
    APIError,
    count_rejection,
    error_response,
    invalid_request,
)
from adapterserve.server.api.jsontext import loads
from adapterserve.server.config import Settings
from adapterserve.server.console import is_console_path

log = logging.getLogger(__name__)

# multipart/form-data bodies: path -> kind ('multipart': an adapter, capped at
# max_upload_bytes; 'file': a fine-tuning file, capped at max_file_bytes)
UPLOAD_ROUTES = {"/v1/adapters": "multipart", "/v1/files": "file"}
MULTIPART_KINDS = frozenset(UPLOAD_ROUTES.values())
# Multipart framing (boundaries, part headers, the `name` / `purpose` field) on top of the file
# bytes, which the stores cap at exactly `max_upload_bytes` / `max_file_bytes`.
UPLOAD_OVERHEAD_BYTES = 64 * 1024
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


# ---------------------------------------------------------------- keys


def bearer_token(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_matches(token: str | None, key: str | None) -> bool:
    # Compare bytes: compare_digest on str refuses non-ASCII, which would turn into a 500.
    return (
        token is not None and key is not None and hmac.compare_digest(token.encode(), key.encode())
    )


def key_fingerprint(token: str | None) -> str | None:
    """What a job records about the key that created it (never the key itself)."""
    return None if token is None else hashlib.sha256(token.encode()).hexdigest()


def unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        "authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def check_key(headers: Headers, keys: tuple[str | None, ...]) -> None:
    """401 unless the bearer token is one of `keys` (no key configured: anything goes)."""
    if all(key is None for key in keys):
        return
    token = bearer_token(headers)
    if token is None:
        raise unauthorized("Missing API key: send the header 'Authorization: Bearer <key>'.")
    if not any([key_matches(token, key) for key in keys]):  # list: compare against every key
        raise unauthorized("Invalid API key.")


def forbidden(message: str) -> APIError:
    return APIError(403, message, "permission_error", code="admin_key_required")


def check_admin_key(headers: Headers, settings: Settings) -> None:
    """An admin route with an admin key configured: that key, else 403 for a valid user key
    (it is a key, without the role) and 401 for anything else."""
    if settings.admin_api_key is None:
        return
    token = bearer_token(headers)
    if token is not None and key_matches(token, settings.admin_api_key):
        return
    if token is not None and any([key_matches(token, key) for key in settings.user_keys]):
        raise forbidden(
            "This key may not change adapters, datasets or other shared state: "
            "send the admin key ('Authorization: Bearer <admin key>')."
        )
    check_key(headers, (settings.admin_api_key,))  # 401: missing or not a key of ours


def public_paths(settings: Settings) -> frozenset[str]:
    return frozenset({"/health"} if settings.ready_requires_key else {"/health", "/ready"})


# ---------------------------------------------------------------- the middleware


BodyRoute = tuple[re.Pattern, frozenset[str], str]  # path regex, methods, 'json' or an upload's


Route = tuple[re.Pattern, frozenset[str]]  # path regex, methods


def routes_depending_on(routes: Iterable[Any], dependency: Any) -> list[Route]:
    """The APIRoutes among `routes` that declare `dependency` (e.g. the admin key's check)."""
    return [
        (route.path_regex, frozenset(route.methods))
        for route in routes
        if any(
            d.call is dependency
            for d in getattr(getattr(route, "dependant", None), "dependencies", ())
        )
    ]


def body_routes(routes: Iterable[Any]) -> list[BodyRoute]:
    """The routes that take a body, and which kind, from the APIRoutes of the app's routers."""
    found = []
    for route in routes:
        kind = UPLOAD_ROUTES.get(getattr(route, "path", None))
        if kind is not None and "POST" in getattr(route, "methods", ()):
            found.append((route.path_regex, frozenset(route.methods), kind))
        elif getattr(route, "body_field", None) is not None:
            found.append((route.path_regex, frozenset(route.methods), "json"))
    return found


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        routes: list[BodyRoute],
        admin_routes: list[Route] = (),
    ) -> None:
        self.app, self.settings, self.routes = app, settings, routes
        self.admin_routes = list(admin_routes)
        self.public = public_paths(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            receive = await self._check(scope, receive)
        except APIError as error:
            count_rejection(scope.get("app"), scope.get("path", ""), "", error.status)
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _check(self, scope: Scope, receive: Receive) -> Receive:
        """The receive the app gets (the body replayed, capped or timed), or an APIError."""
        headers = Headers(scope=scope)
        settings = self.settings
        path = scope["path"]
        if path not in self.public and not is_console_path(path) and settings.user_keys:
            check_key(headers, (*settings.user_keys, settings.admin_api_key))
        if any(
            scope["method"] in methods and regex.match(path) for regex, methods in self.admin_routes
        ):
            check_admin_key(headers, settings)  # the role before the content type (403, 415)
        kind = self._body_kind(scope)
        if kind is None:
            return receive
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        check_content_type(kind, content_type)
        limit = self._limit(kind)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(kind, settings)
        timed = timed_receive(receive, BodyClock.from_settings(settings), client_name(scope))
        if kind in MULTIPART_KINDS:
            return capped_receive(timed, limit, kind, settings)
        body = await read_body(timed, limit, kind, settings)
        if len(body) > INLINE_JSON_BYTES:
            await asyncio.to_thread(check_json, body)
        elif body:
            check_json(body)
        return replay(body, receive)

    def _body_kind(self, scope: Scope) -> str | None:
        """'json', 'multipart' or 'file' for the route this request reaches, None when it takes no
        body (or matches no route: the router answers 404/405 without reading it)."""
        if scope["method"] not in BODY_METHODS:
            return None
        for path_regex, methods, kind in self.routes:
            if scope["method"] in methods and path_regex.match(scope["path"]):
                return kind
        return None

    def _limit(self, kind: str) -> int:
        if kind == "multipart":
            return self.settings.max_upload_bytes + UPLOAD_OVERHEAD_BYTES
        if kind == "file":
            return self.settings.max_file_bytes + UPLOAD_OVERHEAD_BYTES
        return self.settings.max_request_body_bytes


def check_content_type(kind: str, content_type: str) -> None:
    if kind == "multipart":
        if content_type != "multipart/form-data":
            raise unsupported_type(
                content_type,
                "Upload an adapter as multipart/form-data: a text field 'name' and either "
                "'files' (adapter_config.json, adapter_model.safetensors) or one 'archive'.",
            )
    elif kind == "file":
        if content_type != "multipart/form-data":
            raise unsupported_type(
                content_type,
                "Upload a file as multipart/form-data: a file part 'file' and a text field "
                "'purpose' ('fine-tune').",
            )
    # A missing content type is read as JSON, as FastAPI does; anything else must say JSON.
    elif content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise unsupported_type(
            content_type, "Send the body as JSON (Content-Type: application/json)."
        )


def unsupported_type(content_type: str, what_to_do: str) -> APIError:
    return APIError(  # the body is left unread: the connection cannot be reused
        415,
        f"This route does not take Content-Type {content_type[:60]!r}. {what_to_do}",
        code="unsupported_content_type",
        headers={"Connection": "close"},
    )


def too_large(kind: str, settings: Settings) -> APIError:
    if kind == "multipart":
        message = (
            f"The upload exceeds {settings.max_upload_bytes} bytes; send a smaller "
            "adapter or raise --max-upload-bytes."
        )
    elif kind == "file":
        message = (
            f"The upload exceeds {settings.max_file_bytes} bytes; split the training data or "
            "raise --max-file-bytes."
        )
    else:
        message = (
            f"The request body exceeds {settings.max_request_body_bytes} bytes; send a "
            "smaller request."
        )
    return APIError(413, message, code="request_too_large", headers={"Connection": "close"})


@dataclass(frozen=True)
class BodyClock:
    """When a request body must have arrived, counted from the end of its headers (Apache's
    mod_reqtimeout `body=grace,MinRate=rate`, with a stall timeout and a hard cap): each
    `min_rate` bytes received buy one second past `grace_s`, never past `deadline_s`; and no
    read may wait longer than `stall_s`. A client trickling a byte every few seconds is cut off
    after about `grace_s`, one at the minimum rate after `deadline_s`."""

    stall_s: float
    grace_s: float
    min_rate: float  # bytes per second
    deadline_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyClock:
        return cls(
            settings.http_body_timeout_s,
            settings.http_body_grace_s,
            settings.http_body_min_rate,
            settings.http_body_deadline_s,
        )

    def allowed_s(self, received: int) -> float:
        """Seconds since the headers within which the body must be complete, so far."""
        return min(self.deadline_s, self.grace_s + received / self.min_rate)

    def wait_s(self, received: int, elapsed_s: float) -> float:
        """How long the next read may wait."""
        return max(0.0, min(self.stall_s, self.allowed_s(received) - elapsed_s))

    def reason(self, received: int, waited_from_s: float) -> str:
        """Why a read that began at `waited_from_s` and waited `wait_s` got nothing."""
        if self.stall_s < self.allowed_s(received) - waited_from_s:
            return f"The request body stalled for {self.stall_s:g} s; send it without pauses."
        if self.allowed_s(received) >= self.deadline_s:
            return (
                f"The request body did not arrive within {self.deadline_s:g} s; send it "
                "faster or in smaller requests."
            )
        return (
            f"The request body came slower than {self.min_rate:g} bytes/s after "
            f"{self.grace_s:g} s ({received} bytes); send it without pauses."
        )


def client_name(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown client"


def timed_receive(receive: Receive, clock: BodyClock, client: str = "") -> Receive:
    """`receive` that raises 408 when the body stalls, falls under the minimum rate or runs
    past its deadline (`clock`); once the body is complete it passes through untimed (later
    receives wait for a disconnect)."""
    complete = False
    started, received = time.monotonic(), 0

    async def receive_timed() -> Message:
        nonlocal complete, received
        if complete:
            return await receive()
        waited_from = elapsed()
        try:
            message = await asyncio.wait_for(receive(), clock.wait_s(received, waited_from))
        except TimeoutError:
            reason = clock.reason(received, waited_from)
            log.warning(
                "closing the connection of %s: %d body bytes in %.1f s. %s",
                client,
                received,
                elapsed(),
                reason,
            )
            raise APIError(
                408, reason, code="body_timeout", headers={"Connection": "close"}
            ) from None
        received += len(message.get("body", b""))
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    def elapsed() -> float:
        return time.monotonic() - started

    return receive_timed


def capped_receive(receive: Receive, limit: int, kind: str, settings: Settings) -> Receive:
    """`receive` that raises 413 as soon as more than `limit` body bytes have arrived."""
    received = 0

    async def receive_capped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large(kind, settings)
        return message

    return receive_capped


async def read_body(receive: Receive, limit: int, kind: str, settings: Settings) -> bytes:
    capped = capped_receive(receive, limit, kind, settings)
    chunks = []
    while True:
        message = await capped()
        if message["type"] == "http.disconnect":
            raise APIError(400, "The client disconnected while sending the body.")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


# JSON bodies up to this size are parsed and walked on the event loop (about a millisecond);
# larger ones on a worker thread: walking a multi-MiB list of token ids on the loop froze every
# stream (BENCHMARKS.md, 'Figures quoted from the code').
INLINE_JSON_BYTES = 64 * 1024


def check_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_request(f"The body is not valid UTF-8 (byte offset {exc.start}).") from None
    value = loads(text)
    if not isinstance(value, dict):
        raise invalid_request(f"The body must be a JSON object, got {type(value).__name__}.")
    return value


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the buffered body once, then passes through (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
