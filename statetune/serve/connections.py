"""uvicorn's h11 protocol with the bounds uvicorn lacks: a header-read timeout and a cap on open connections.

uvicorn times out a connection only while it is idle *after* a response (``timeout_keep_alive``); a client
that connects and never finishes its headers holds a socket for ever, and ``limit_concurrency`` answers 503
only once a request's headers have arrived, so it counts such a client without ever closing it. Here:

- a connection must deliver a request's complete headers within ``header_timeout`` seconds of being ready
  for one (accepted, or done with the previous response), or it is closed;
- at ``max_connections`` open connections a new one closes the connection that has waited longest for a
  request (idle or still sending headers) to take its place, so a flood of idle connections cannot lock out
  ``/health`` or a real client; a request in progress (a stream) is never closed for room. When every
  connection has a request in progress the new one gets a 503 and is closed at once.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from statetune.serve.errors import error_body
from statetune.serve.fdlimits import ConnectionLimits

log = logging.getLogger("statetune.serve")


def _busy_response() -> bytes:
    body = json.dumps(error_body(503, "too many open connections; try again shortly",
                                 code="too_many_connections"), allow_nan=False).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\nretry-after: 1\r\n\r\n")
    return head.encode() + body


BUSY = _busy_response()


class BoundedH11Protocol(H11Protocol):
    """:class:`H11Protocol` under :class:`ConnectionLimits` (see the module's docstring)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.limits = limits
        self.refused = False
        self.waiting_since = 0.0
        self.header_timer = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections and not self._make_room():
            self.transport, self.refused = transport, True
            log.warning("refused a connection: all %d connections have a request in progress (--max-connections)",
                        len(self.connections))
            transport.write(BUSY)
            transport.close()
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self.refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.header_timer is not None and self.conn.their_state is not h11.IDLE:
            self._disarm()  # the request's headers are in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # waiting for the next request on this connection

    @property
    def waiting(self) -> bool:
        """Open and waiting for a request's headers (never true while a request is in progress)."""
        return (not self.refused and self.transport is not None and not self.transport.is_closing()
                and (self.cycle is None or self.cycle.response_complete) and self.conn.their_state is h11.IDLE)

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False when none is waiting."""
        waiting = [c for c in self.connections if isinstance(c, BoundedH11Protocol) and c.waiting]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.waiting_since)
        log.warning("closed an idle connection to make room: %d connections open (--max-connections)",
                    len(self.connections))
        oldest._close()
        return True

    def _arm(self) -> None:
        self._disarm()
        self.waiting_since = self.loop.time()
        self.header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.waiting:
            log.warning("closed a connection that sent no complete request within %gs (--header-timeout)",
                        self.limits.header_timeout)
            self._close()

    def _close(self) -> None:
        self._disarm()
        self._unset_keepalive_if_required()
        self.transport.close()
