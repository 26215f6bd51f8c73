"""The HTTP/1.1 connection limits that a slow or greedy client must not get around.

uvicorn times idle keep-alive connections only: a client that trickles a request's headers a
byte at a time (slowloris) keeps its connection, and enough of them exhaust the process's file
descriptors, so that accept fails and health probes time out. `guarded_protocol(settings)` is
uvicorn's h11 protocol with:
- a header timeout: a request's headers must be complete within `http_header_timeout_s` of the
  connection opening (or of the previous response on a kept-alive connection); otherwise the
  client gets a 408 and the connection closes. Bodies are timed by RequestGuard (a stall
  timeout, a minimum rate, a deadline: server/api/guards.py);
- connection caps: past `max_connections_per_client` connections from one address, or
  `max_connections + probe_connections` in all, a new connection gets a 503 + Retry-After at
  once and is closed, so descriptors stay available for other clients and for the server's own
  files;
- probe headroom: the caps count connections before a request line is read, so a full cap
  would refuse a load balancer's `/health` or `/ready` too (two addresses at the per-client cap
  filled the whole of it). The `probe_connections` past `max_connections` are kept for probes:
  such a connection is served `/health` and `/ready` only (anything else is the cap's 503), at
  most PROBES_PER_CLIENT of them from one address, so that the addresses that filled the cap
  cannot take the headroom too.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from adapterserve.server.api.errors import error_body
from adapterserve.server.config import Settings

PROBE_PATHS = frozenset({"/health", "/ready"})
PROBES_PER_CLIENT = 2  # headroom connections one address may hold (a prober needs one)


def raw_response(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 error response in OpenAI's error shape, closing the connection."""
    body = json.dumps(
        error_body(
            message, "service_unavailable_error" if status == 503 else "invalid_request_error"
        )
    ).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def probe_only(app: ASGIApp, message: str, retry_after_s: int) -> ASGIApp:
    """`app` for PROBE_PATHS; the connection cap's 503 (closing) for every other path."""
    refusal = raw_response(503, "Service Unavailable", message, retry_after_s)
    head, _, body = refusal.partition(b"\r\n\r\n")
    headers = [tuple(line.lower().split(b": ", 1)) for line in head.split(b"\r\n")[1:]]

    async def gate(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return gate


def guarded_protocol(settings: Settings) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with the header timeout and connection caps of `settings`."""

    class GuardedH11Protocol(H11Protocol):
        header_timeout_s = settings.http_header_timeout_s
        max_connections = settings.max_connections
        max_per_client = settings.max_connections_per_client
        probe_headroom = settings.probe_connections
        retry_after_s = settings.retry_after_s
        probe_only = False  # a connection in the headroom: /health and /ready only

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            self._timed_cycle = None
            refusal = self._over_cap()
            if refusal is not None:
                self.transport.write(
                    raw_response(503, "Service Unavailable", refusal, self.retry_after_s)
                )
                self.transport.close()
                return
            if len(self.connections) > self.max_connections:
                self.probe_only = True
                self.app = probe_only(self.app, self._cap_message(), self.retry_after_s)
            self._start_header_timer()

        def _over_cap(self) -> str | None:
            """Why this new connection is refused, or None (then it may be a probe's)."""
            host = self.client[0] if self.client else None
            peers = [c for c in self.connections if c.client and c.client[0] == host]
            if host is not None and len(peers) > self.max_per_client:
                return (
                    f"This client has {self.max_per_client} open connections, the limit per "
                    "client; reuse a connection or retry later."
                )
            if len(self.connections) <= self.max_connections:
                return None
            probes = sum(1 for c in peers if getattr(c, "probe_only", False))
            if (
                len(self.connections) > self.max_connections + self.probe_headroom
                or probes >= PROBES_PER_CLIENT
            ):
                return self._cap_message()
            return None

        def _cap_message(self) -> str:
            return (
                f"The server has {self.max_connections} open connections, its limit; retry later."
            )

        def _start_header_timer(self) -> None:
            self._stop_header_timer()
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            message = (
                f"The request headers did not arrive within {self.header_timeout_s:g} s; "
                "send them without pauses."
            )
            self.transport.write(raw_response(408, "Request Timeout", message))
            self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self.cycle is not self._timed_cycle:
                self._timed_cycle = self.cycle  # a new request's headers are complete
                self._stop_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may already start a pipelined request
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                self._start_header_timer()  # the next request on this connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

    return GuardedH11Protocol
