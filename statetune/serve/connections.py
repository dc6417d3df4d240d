"""uvicorn's h11 protocol with the bounds uvicorn lacks: a header-read timeout and a cap on open connections.

uvicorn times out a connection only while it is idle *after* a response (``timeout_keep_alive``); a client
that connects and never finishes its headers holds a socket for ever, and ``limit_concurrency`` answers 503
only once a request's headers have arrived, so it counts such a client without ever closing it. Here:

- a connection must deliver a request's complete headers within ``header_timeout`` seconds of being ready
  for one (accepted, or done with the previous response), and then its body within ``header_timeout``
  seconds more, or it is closed (a body sent a byte at a time would otherwise hold a connection that is
  never idle, so never closed for room);
- a request's headers are at most :data:`MAX_HEADER_BYTES` all together, however they arrive (h11 bounds
  only headers still incomplete, so a larger block that arrives in one piece would pass): a 400 beyond;
- at ``max_connections`` open connections a new one closes the connection that has waited longest for a
  request (idle or still sending headers) to take its place, so a flood of idle connections cannot lock out
  ``/health`` or a real client; a request in progress (a stream) is never closed for room. When every
  connection has a request in progress the new one gets a 503 and is closed at once.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from statetune.serve.errors import error_body
from statetune.serve.fdlimits import ConnectionLimits

log = logging.getLogger("statetune.serve")
MAX_HEADER_BYTES = 16 << 10  # a request's headers, all together (h11's own default for incomplete ones)
_END_OF_HEADERS = re.compile(rb"\n\r?\n")  # the blank line that ends them, as h11 finds it


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
        self.body_timed = False  # the timer now running is the body's

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
        if self.conn.their_state is h11.IDLE and not self.refused and self._headers_too_large():
            log.warning("refused a request whose headers exceed %d bytes", MAX_HEADER_BYTES)
            self._disarm()
            self.send_400_response(f"Request headers larger than {MAX_HEADER_BYTES} bytes")
            return
        super().handle_events()
        state = self.conn.their_state
        if self.header_timer is not None and not self.body_timed and state is not h11.IDLE:
            self._disarm()  # the request's headers are in
            if state is h11.SEND_BODY:  # and its body has the same time to arrive
                self.header_timer = self.loop.call_later(self.limits.header_timeout, self._body_timeout)
                self.body_timed = True
        elif self.body_timed and state is not h11.SEND_BODY:
            self._disarm()  # the body is in

    def _headers_too_large(self) -> bool:
        data = self.conn.trailing_data[0]
        if len(data) <= MAX_HEADER_BYTES:
            return False
        return _END_OF_HEADERS.search(data, 0, MAX_HEADER_BYTES + 3) is None

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
        self.body_timed = False
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _body_timeout(self) -> None:
        self.header_timer, self.body_timed = None, False
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            log.warning("closed a connection whose request body did not arrive within %gs (--header-timeout)",
                        self.limits.header_timeout)
            self._close()

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
