"""One HTTP request carried between two processes as plain data: the pieces of the Ray deployment that need no
Ray (``ray_app`` is the rest).

The front process reads a request (:func:`read_request`: method, path, headers, the whole body, already
behind the API key and body-size guard), picks the state it asks for (:func:`state_of`: the body's
``"model"``), and hands the dict to a replica; the replica runs it through the unchanged FastAPI app in its
own process (:func:`run_asgi`) and sends back the app's ASGI messages in batches (the body chunks that are
ready at once are joined, so a busy stream costs one message per batch, not per token). A request whose
client leaves is cancelled, and the app sees ``http.disconnect`` as it would under uvicorn.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from statetune.serve.errors import error_body
from statetune.serve.guard import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = "x-statetune-replica"
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer"}
# routes whose body names the state to route by: the generation routes' "model", a new state's "from"
_MODEL_FIELD = {"/v1/completions": "model", "/v1/chat/completions": "model", "/v1/states": "from"}


async def read_request(scope: Scope, receive: Receive) -> dict[str, Any]:
    """The request of ``scope`` as plain data (its whole body read): what a replica needs to answer it."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("the client went away")
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    return {"method": scope["method"], "path": scope["path"], "raw_path": scope.get("raw_path"),
            "query_string": scope.get("query_string", b""), "http_version": scope.get("http_version", "1.1"),
            "scheme": scope.get("scheme", "http"), "client": scope.get("client"), "server": scope.get("server"),
            "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() not in HOP_BY_HOP],
            "body": bytes(body)}


def state_of(request: dict[str, Any]) -> str | None:
    """The state a request names (the body's ``"model"``; a new state's ``"from"``), or None: the id the
    request is routed by, so that requests for one state go to a replica that has it loaded."""
    field = _MODEL_FIELD.get(request["path"])
    if field is None or request["method"] != "POST":
        return None
    try:
        body = json.loads(request["body"])
    except ValueError:
        return None
    name = body.get(field) if isinstance(body, dict) else None
    return name if isinstance(name, str) and 0 < len(name) <= 256 else None


async def run_asgi(app: ASGIApp, request: dict[str, Any], replica: str = "") -> AsyncIterator[list[Message]]:
    """Answer ``request`` with ``app`` in this process, yielding its ASGI send messages in batches (the
    response start first; consecutive body chunks joined). ``replica`` goes into the response headers.

    Closing the iterator early (the client left, the caller was cancelled) tells the app the client
    disconnected and cancels it, so the engine drops the sequence at once.
    """
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "root_path": "",
             **{k: v for k, v in request.items() if k != "body"}}
    scope["raw_path"] = scope.get("raw_path") or request["path"].encode()
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and replica:
            message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), replica.encode())]}
        queue.put_nowait(message)

    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    finished = False  # the whole response has gone out
    try:
        ended = False
        while not ended and (message := await queue.get()) is not None:
            batch = [message]
            while not queue.empty():
                more = queue.get_nowait()
                if more is None:
                    ended = True
                    break
                if more["type"] == batch[-1]["type"] == "http.response.body":
                    batch[-1] = {**more, "body": batch[-1].get("body", b"") + more.get("body", b"")}
                else:
                    batch.append(more)
            finished |= any(m["type"] == "http.response.body" and not m.get("more_body") for m in batch)
            yield batch
        if not task.cancelled() and task.exception() is not None and not finished:
            raise task.exception()  # the app failed before it answered (after, the answer stands)
    finally:
        gone.set()
        if not task.done():
            task.cancel()


async def reply(send: Send, status: int, message: str, code: str | None = None) -> None:
    """Answer with an OpenAI-style error body (the front's own errors: a replica lost, a bad request)."""
    data = json.dumps(error_body(status, message, code=code), allow_nan=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI lifespan exchange for an app with nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def is_stream(start: Message) -> bool:
    """Whether a response (its ``http.response.start``) is a server-sent-event stream."""
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start.get("headers", []))


def stream_error(message: str) -> bytes:
    """The end of a stream that cannot finish: an ``error`` event, then ``data: [DONE]`` (as the app ends its own)."""
    body = json.dumps(error_body(503, message, code="replica_failed"), allow_nan=False)
    return b"data: " + body.encode() + b"\n\ndata: [DONE]\n\n"


__all__ = ["REPLICA_HEADER", "ASGIApp", "Scope", "is_stream", "lifespan", "read_request", "reply", "run_asgi",
           "state_of", "stream_error"]
