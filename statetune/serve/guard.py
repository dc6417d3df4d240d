"""ASGI middleware in front of the routes: the API key and a cap on the request body.

Both checks run before FastAPI reads or parses anything, so an unauthenticated client learns nothing about
the API (not even whether its JSON is valid) and a huge body is refused instead of read into memory. The
key is compared in constant time. ``/health`` stays open so that a load balancer needs no key, and so do
the playground's page and files (they hold no data; the API calls the page makes need the key).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from statetune.serve.errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/health", "/")
OPEN_PREFIXES = ("/playground/",)


class Guard:
    """Refuse requests without ``Authorization: Bearer KEY`` (401) or with a body over ``max_body`` (413)."""

    def __init__(self, app: ASGIApp, api_key: str | None = None, max_body: int = 4 << 20) -> None:
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None and not _open(scope.get("path", "")) and not self._authorized(headers):
            await _reply(send, 401, error_body(401, "missing or wrong API key: send the header "
                                                    "'Authorization: Bearer KEY'", code="invalid_api_key"),
                         [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _reply(send, 413, self._too_large())
            return
        await self.app(scope, *self._capped(receive, send))

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    def _too_large(self) -> dict[str, Any]:
        return error_body(413, f"the request body is over {self.max_body} bytes", code="request_too_large")

    def _capped(self, receive: Receive, send: Send) -> tuple[Receive, Send]:
        """``receive`` and ``send`` for a body without a length: past the cap, answer 413 ourselves, tell the
        app the client left, and drop whatever the app still sends."""
        seen = 0
        refused = False

        async def capped_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    refused = True
                    await _reply(send, 413, self._too_large())
                    return {"type": "http.disconnect"}
            return message

        async def capped_send(message: Message) -> None:
            if not refused:
                await send(message)

        return capped_receive, capped_send


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


async def _reply(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body, allow_nan=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})
