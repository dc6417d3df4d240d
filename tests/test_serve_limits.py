"""``statetune serve`` against a hostile client: connection floods, authority over state files, exit status.

- A flood of idle, half-open connections under a low open-file limit: ``/health`` and a stream in flight
  keep working, the idle connections are closed after ``--header-timeout``, the log stays small.
- What ``DELETE /v1/states/NAME`` may remove is decided by the server's own ledger, never by a file's
  metadata; ``--max-api-states`` bounds the files the API writes.
- SIGTERM ends the server with status 143, as docs/errors.md says.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import statetune
from statetune.errors import OptionError
from statetune.serve.fdlimits import connection_limits, reserve
from statetune.serve.ledger import LEDGER, Ledger
from statetune.serve.logfilter import RepeatFilter

ROOT = Path(__file__).resolve().parents[1]


# -- options and limits (no server) -------------------------------------------------------------------------------
def test_connection_cap_leaves_files_free():
    for limit in (128, 256, 1024, 65536):
        lim = connection_limits(None, limit=limit)
        assert lim.max_connections + lim.backlog + 32 <= limit  # a burst of accepts never reaches the limit
    assert connection_limits(100, limit=1024).max_connections == 100
    with pytest.raises(OptionError, match="--max-connections: 1000 .*open-file limit of 1024"):
        connection_limits(1000, limit=1024)
    with pytest.raises(OptionError, match="--max-connections"):
        connection_limits(None, limit=reserve(40) // 2)


@pytest.mark.parametrize("field,value,message", [
    ("header_timeout", 0.0, "--header-timeout: must be a finite number of seconds above 0"),
    ("header_timeout", float("nan"), "--header-timeout"),
    ("keep_alive_timeout", -1.0, "--keep-alive-timeout"),
    ("max_connections", 0, "--max-connections: must be at least 1"),
    ("max_connections", 10**9, "--max-connections: 1000000000 would leave too few files"),
    ("max_api_states", -1, "--max-api-states: must be 0 or more"),
])
def test_bad_limit_options_name_the_flag(tiny_ckpt, field, value, message):
    from statetune.commands.serve import ServeOptions

    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        ServeOptions(model=str(tiny_ckpt("rwkv7")), **{field: value})


def test_repeated_warnings_are_logged_once_per_interval_with_a_count():
    now = [0.0]
    filt = RepeatFilter(10.0, clock=lambda: now[0])

    def record(msg: str, level: int = logging.WARNING, args=()) -> logging.LogRecord:
        return logging.LogRecord("asyncio", level, __file__, 1, msg, args, None)

    first = record("socket.accept() out of system resource")
    assert filt.filter(first)
    assert not any(filt.filter(record("socket.accept() out of system resource")) for _ in range(500))
    assert filt.filter(record("another error"))  # a different kind passes
    assert filt.filter(record("closed %d connections", args=(3,)))
    assert not filt.filter(record("closed %d connections", args=(4,)))  # same template, other values
    assert all(filt.filter(record("access", logging.INFO)) for _ in range(50))  # below WARNING: never dropped
    now[0] = 11.0
    again = record("socket.accept() out of system resource")
    assert filt.filter(again) and "500 more like this" in again.getMessage()


def test_ledger_owns_only_the_very_file_it_wrote(tmp_path):
    ledger = Ledger(tmp_path)
    mine, copied = tmp_path / "mine.safetensors", tmp_path / "copied.safetensors"
    mine.write_bytes(b"state one")
    ledger.record("mine", mine)
    assert ledger.owns("mine", mine, digest=True) and ledger.count() == 1
    assert Ledger(tmp_path).owns("mine", mine, digest=True)  # read back from disk
    shutil.copy(mine, copied)
    assert not ledger.owns("copied", copied)  # never recorded
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"state two")
    os.replace(replacement, mine)  # the operator replaces the file
    assert not ledger.owns("mine", mine) and ledger.count() == 0
    (tmp_path / LEDGER).write_text("{not json")
    assert Ledger(tmp_path).records == {}  # unreadable: nothing is deletable


def test_run_server_reports_an_interrupt(monkeypatch):
    from statetune.serve.startup import run_server

    class Stopped:
        started = True

        def run(self):
            raise KeyboardInterrupt  # what uvicorn re-raises after shutting down on Ctrl-C or SIGTERM

    assert run_server(Stopped(), "127.0.0.1", 0) == 130  # the CLI turns it into 143 after SIGTERM


# -- a real server in a subprocess, under a low open-file limit ----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1 << 16) == b""  # EOF (anything else: an answer, then EOF)
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.slow
def test_flood_of_idle_connections_under_a_low_file_limit(tiny_ckpt, tmp_path):
    """300 half-open connections against a server limited to 256 open files."""
    port, nofile = _free_port(), 256
    err = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "statetune", "serve", "--model", str(tiny_ckpt("rwkv7")), "--tokenizer", "bytes",
           "--port", str(port), "--threads", "1", "--header-timeout", "2", "--max-tokens-limit", "1000"]

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(err, "wb") as err_f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_f, env=env, preexec_fn=low_limit)
    flood: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        stream = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {"model": "rwkv7", "prompt": "Once", "max_tokens": 1000, "stream": True, "temperature": 1.0}
        stream.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = stream.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")  # in flight

        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            flood.append(s)
        health = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        health.request("GET", "/health")
        h = health.getresponse()
        assert h.status == 200 and json.loads(h.read())["status"] == "ok"

        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"error"' not in rest  # the stream finished

        deadline = time.monotonic() + 20
        open_ = flood
        while open_ and time.monotonic() < deadline:
            open_ = [s for s in open_ if not _closed_by_server(s)]
            time.sleep(0.2)
        assert not open_, f"{len(open_)} idle connections still open after the header timeout"
    finally:
        for s in flood:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    log = err.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, log[-2000:]
    assert "Too many open files" not in log and "Traceback" not in log, log[-2000:]
    assert len(log) < 20_000, log[-2000:]
    assert "--header-timeout" in log  # the closing was said, once per interval


# -- in-process servers: the cap, and states over the API ---------------------------------------------------------
fastapi = pytest.importorskip("fastapi")
pytest.importorskip("openai")
from serve_helpers import KEY, Running, random_state  # noqa: E402

from statetune.commands.serve import ServeOptions  # noqa: E402


@pytest.fixture
def world(tiny_ckpt, tmp_path):
    path = tiny_ckpt("rwkv7")
    model = statetune.load_model(path)
    states = tmp_path / "states"
    states.mkdir()
    return {"model": path, "loaded": model, "states": states, "root": tmp_path}


def start(world, **kw) -> Running:
    base = dict(model=str(world["model"]), states=str(world["states"]), model_name="base", api_key=KEY,
                max_tokens_limit=50, max_batch_size=4, tokenizer="bytes")
    return Running(ServeOptions(**{**base, **kw}))


def _raw(server: Running) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


@pytest.mark.slow
def test_connection_cap_evicts_the_idle_and_refuses_when_all_are_busy(world):
    server = start(world, max_connections=2)
    try:
        idle = [_raw(server) for _ in range(2)]
        time.sleep(0.3)  # both accepted (the oldest is closed for room first)
        assert server.get("/health").status_code == 200
        assert _eventually(lambda: _closed_by_server(idle[0]))
        busy = []
        for _ in range(2):  # requests in progress (their bodies never come): not closed for room
            s = _raw(server)
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
            busy.append(s)
        assert _eventually(lambda: server.get("/health").status_code == 503)
        r = server.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
        busy[0].close()
        assert _eventually(lambda: server.get("/health").status_code == 200)
        for s in idle + busy:
            s.close()
    finally:
        server.stop()


def _eventually(check, timeout: float = 15.0) -> bool:
    """Poll ``check`` until it holds (a loaded machine may take a while to run the server's side), or give up."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _persist(server: Running, name: str):
    return server.post("/v1/states", {"name": name, "tokens": [5, 6, 7], "persist": True})


@pytest.mark.slow
def test_only_files_the_server_wrote_can_be_deleted(world):
    model, states = world["loaded"], world["states"]
    # an operator's file that claims to come from the API
    statetune.save_state(states / "operator.safetensors", random_state(model, 3), model,
                         {"tokenizer": "bytes", "created_by": "api"}, with_shift=True)
    server = start(world)
    try:
        listed = {s["id"]: s for s in server.get("/v1/states").json()["data"]}
        assert listed["operator"]["deletable"] is False
        r = server.request("DELETE", "/v1/states/operator")
        assert r.status == 403 and (states / "operator.safetensors").is_file()

        assert _persist(server, "mine").status_code == 201
        assert _persist(server, "replaced").status_code == 201
        assert server.request("DELETE", "/v1/states/mine", key=None).status == 401  # the key is needed
        statetune.save_state(states / "replaced.safetensors", random_state(model, 4), model,
                             {"tokenizer": "bytes", "created_by": "api"}, with_shift=True)  # the operator's now
        server.post("/v1/states/reload", {})
        assert server.request("DELETE", "/v1/states/replaced").status == 403
        assert (states / "replaced.safetensors").is_file()
    finally:
        server.stop()
    server = start(world)  # after a restart, the server's own files are still its own
    try:
        assert server.request("DELETE", "/v1/states/mine").status == 200
        assert not (states / "mine.safetensors").exists()
        assert "mine" not in json.loads((states / LEDGER).read_text())["states"]
        assert server.request("DELETE", "/v1/states/operator").status == 403
    finally:
        server.stop()


@pytest.mark.slow
def test_max_api_states_bounds_the_files_written(world):
    states = world["states"]
    server = start(world, max_api_states=1)
    try:
        assert _persist(server, "one").status_code == 201
        r = _persist(server, "two")
        assert r.status_code == 403 and r.json()["error"]["code"] == "state_quota_exceeded", r.text
        assert "--max-api-states" in r.json()["error"]["message"] and not (states / "two.safetensors").exists()
        assert server.post("/v1/states", {"name": "two", "tokens": [5]}).status_code == 201  # in memory: fine
        assert server.request("DELETE", "/v1/states/one").status == 200
        assert _persist(server, "three").status_code == 201  # room again
    finally:
        server.stop()
    server = start(world, max_api_states=0)
    try:
        assert _persist(server, "four").status_code == 403
    finally:
        server.stop()
