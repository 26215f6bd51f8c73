"""The HTTP/1.1 connection limits that a slow or greedy client must not get around.

uvicorn times idle keep-alive connections only: a client that trickles a request's headers a
byte at a time (slowloris) keeps its connection, and enough of them exhaust the process's file
descriptors, so that accept fails and health probes time out. `guarded_protocol(settings)` is
uvicorn's h11 protocol with:
- a header timeout: a request's headers must be complete within `http_header_timeout_s` of the
  connection opening (or of the previous response on a kept-alive connection); otherwise the
  client gets a 408 and the connection closes. Bodies are timed per read by RequestGuard;
- connection caps: past `max_connections` open connections in all, or
  `max_connections_per_client` from one address, a new connection gets a 503 + Retry-After at
  once and is closed, so descriptors stay available for other clients and for the server's own
  files.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from adapterserve.server.config import Settings
from adapterserve.server.errors import error_body


def raw_response(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 error response in OpenAI's error shape, closing the connection."""
    body = json.dumps(error_body(message, "service_unavailable_error" if status == 503
                                 else "invalid_request_error")).encode()  # fmt: skip
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]  # fmt: skip
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def guarded_protocol(settings: Settings) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with the header timeout and connection caps of `settings`."""

    class GuardedH11Protocol(H11Protocol):
        header_timeout_s = settings.http_header_timeout_s
        max_connections = settings.max_connections
        max_per_client = settings.max_connections_per_client
        retry_after_s = settings.retry_after_s

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            self._timed_cycle = None
            refusal = self._over_cap()
            if refusal is not None:
                self.transport.write(raw_response(
                    503, "Service Unavailable", refusal, self.retry_after_s))  # fmt: skip
                self.transport.close()
                return
            self._start_header_timer()

        def _over_cap(self) -> str | None:
            if len(self.connections) > self.max_connections:
                return (f"The server has {self.max_connections} open connections, its limit; "
                        "retry later.")  # fmt: skip
            host = self.client[0] if self.client else None
            same = sum(1 for c in self.connections if c.client and c.client[0] == host)
            if host is not None and same > self.max_per_client:
                return (f"This client has {self.max_per_client} open connections, the limit per "
                        "client; reuse a connection or retry later.")  # fmt: skip
            return None

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
            message = (f"The request headers did not arrive within {self.header_timeout_s:g} s; "
                       "send them without pauses.")  # fmt: skip
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
