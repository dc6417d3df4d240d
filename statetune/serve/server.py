"""uvicorn's server with a graceful drain: on Ctrl-C or SIGTERM, requests in flight get to finish.

Shutdown goes: stop accepting connections; refuse new requests with 503; wait up to the grace period for
the requests in flight; end the rest with an error event (streams still end with ``data: [DONE]``) or a
503; then let uvicorn close the connections and run the app's shutdown, which stops the engine thread.
A second Ctrl-C skips the wait.

While it runs, repeated warnings are logged once per interval (:mod:`statetune.serve.logfilter`).
"""

from __future__ import annotations

import logging
import socket

import uvicorn

from statetune.serve.logfilter import quiet_repeats
from statetune.serve.service import Service

log = logging.getLogger("statetune.serve")


class Server(uvicorn.Server):
    """A ``uvicorn.Server`` that drains ``service`` before shutting down, and says where it listens."""

    def __init__(self, config: uvicorn.Config, service: Service, grace: float = 10.0) -> None:
        super().__init__(config)
        self.service, self.grace = service, grace
        self.urls: list[str] = []

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        with quiet_repeats():
            await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets or ():
                host, port = sock.getsockname()[:2]
                self.urls.append(f"http://{f'[{host}]' if ':' in host else host}:{port}")
        if self.started and self.urls:
            log.info("listening on %s (OpenAI base URL %s/v1)", ", ".join(self.urls), self.urls[0])

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in getattr(self, "servers", []):
            server.close()  # no new connections while draining (uvicorn closes them again, harmlessly)
        await self.service.drain(self.grace, lambda: self.force_exit)
        await super().shutdown(sockets)
