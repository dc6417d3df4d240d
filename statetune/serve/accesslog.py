"""The outermost ASGI layer: counts every answer in ``/metrics`` and, with ``--access-log``, logs it as one
JSON line on the ``statetune.serve.access`` logger.

A line has the method, the route (a path template such as ``/v1/states/{name}``, never a raw path, so
that no client text reaches a log or a metric label unchecked), the status, the duration, the client
address, and what the route added with :func:`request_info` (the model, prompt and completion tokens, the
prompt tokens the prefix cache saved, the time to first token, an error message).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.requests import Request

from statetune.serve.guard import ASGIApp, Message, Receive, Scope, Send
from statetune.serve.metrics import Metrics

log = logging.getLogger("statetune.serve.access")
INFO_KEY = "statetune.info"
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/states",
          "/v1/states/reload", "/tokenizer_info", "/tokenize", "/detokenize")


def request_info(request: Request) -> dict[str, Any]:
    """The dict of access-log fields of this request (routes add to it)."""
    return request.scope.setdefault(INFO_KEY, {})


def route_of(path: str) -> str:
    """The route template of a path, for labels and logs (unknown paths are ``other``)."""
    if path in ROUTES or path.startswith("/playground/"):
        return path if not path.startswith("/playground/") else "/playground/{file}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}"
    if path.startswith("/v1/states/"):
        return "/v1/states/{name}"
    return "other"


class AccessLog:
    """Wraps ``app``: one metric per answer, one JSON log line when ``enabled``."""

    def __init__(self, app: ASGIApp, metrics: Metrics, enabled: bool = False) -> None:
        self.app, self.metrics, self.enabled = app, metrics, enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 0
        info = scope.setdefault(INFO_KEY, {})

        async def logged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            route = route_of(scope.get("path", ""))
            self.metrics.requests.labels(route, str(status or 500)).inc()
            if self.enabled:
                client = scope.get("client")
                line = {"method": scope.get("method"), "route": route, "status": status or 500,
                        "duration_ms": round((time.perf_counter() - start) * 1e3, 1),
                        "client": f"{client[0]}:{client[1]}" if client else None, **info}
                log.info("%s", json.dumps(line, ensure_ascii=True, separators=(",", ":"), allow_nan=False))
