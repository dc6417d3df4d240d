"""What the server tests share: a server on a free loopback port in this process, plain HTTP, random states."""

from __future__ import annotations

import http.client
import json
import threading
import time

import openai
import state_compare

from statetune.commands.serve import ServeOptions, bound_socket, build_service, make_server
from statetune.model.state import RWKVState

KEY = "test-key-123"


def random_state(model, seed: int) -> RWKVState:
    """A batch-1 random state (see :func:`state_compare.random_state`)."""
    return state_compare.random_state(model, 1, seed)


class Raw:
    """A plain HTTP response (``http.client``, so that tests see exactly what goes over the wire)."""

    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.status_code, self.headers = resp.status, {k.lower(): v for k, v in resp.getheaders()}
        self.text = resp.read().decode()

    def json(self):
        return json.loads(self.text)


class Running:
    """A server running on a background thread, on a free loopback port."""

    def __init__(self, opts: ServeOptions) -> None:
        self.service = build_service(opts)
        self.server = make_server(opts, self.service)
        sock = bound_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def connect(self) -> http.client.HTTPConnection:
        host, port = self.url.removeprefix("http://").split(":")
        return http.client.HTTPConnection(host, int(port), timeout=30)

    def request(self, method: str, path: str, body=None, key: str | None = KEY) -> http.client.HTTPResponse:
        """Send a request; ``body`` is JSON-encoded unless it is bytes already."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
            body = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn = self.connect()
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse()

    def post(self, path: str, body, key: str | None = KEY) -> Raw:
        return Raw(self.request("POST", path, body, key))

    def get(self, path: str, key: str | None = KEY) -> Raw:
        return Raw(self.request("GET", path, None, key))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()


def stream_text(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            c = chunk.choices[0]
            text += (c.delta.content or "") if hasattr(c, "delta") else c.text
            finish = c.finish_reason or finish
    return text, finish
