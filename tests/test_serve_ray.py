"""``serve --ray``: the relay without Ray (fast), then two replicas on a local Ray instance (slow): the same
answers as one process, a state's requests on one replica, states created on one replica served by all, and a
replica killed under load."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from serve_helpers import KEY, Running, random_state

import statetune
from statetune.commands.serve import ServeOptions
from statetune.errors import OptionError
from statetune.serve import relay

N_STATES = 50


# -- the relay alone -------------------------------------------------------------------------------------------
def request(path: str, body: dict | bytes, method: str = "POST") -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return {"method": method, "path": path, "query_string": b"", "headers": [(b"content-type", b"application/json")],
            "body": data}


def test_state_of_reads_the_routing_name():
    assert relay.state_of(request("/v1/completions", {"model": "s3", "prompt": "x"})) == "s3"
    assert relay.state_of(request("/v1/chat/completions", {"model": "s1", "messages": []})) == "s1"
    assert relay.state_of(request("/v1/states", {"name": "new", "from": "s2"})) == "s2"
    assert relay.state_of(request("/v1/completions", b"{not json")) is None
    assert relay.state_of(request("/v1/completions", {"model": 3})) is None
    assert relay.state_of(request("/v1/models", {}, "GET")) is None


def test_run_asgi_relays_and_joins_chunks():
    async def app(scope, receive, send):
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
        for part in (body, b"-a", b"-b"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def collect():
        return [m async for batch in relay.run_asgi(app, request("/x", b"hi"), "r1") for m in batch]

    messages = asyncio.run(collect())
    start, *bodies = messages
    assert start["status"] == 201 and (b"x-statetune-replica", b"r1") in start["headers"]
    assert b"".join(m["body"] for m in bodies) == b"hi-a-b" and not bodies[-1]["more_body"]


def test_run_asgi_stops_the_app_when_the_client_leaves():
    seen = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        try:
            seen.append((await receive())["type"])  # waits until the reader goes away
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def leave_after_first():
        stream = relay.run_asgi(app, request("/x", b""))
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.sleep(0.05)

    asyncio.run(leave_after_first())
    assert seen in (["http.disconnect"], ["cancelled"])  # either way the app stops (the engine drops it)


def test_app_builder_arguments():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'statetune[ray]')")
    from statetune.serve.ray_app import config_from_args

    cfg = config_from_args({"model": "m.pth", "states": "dir", "replicas": "3", "max-batch-size": "8",
                            "cache_mb": "0.5", "affinity": "false"})
    assert (cfg.replicas, cfg.service["max_batch_size"], cfg.service["cache_mb"], cfg.affinity) == (3, 8, 0.5, False)
    assert cfg.service["base_name"] == "m" and cfg.model["model"] == "m.pth"
    with pytest.raises(OptionError, match="replicas: expected int, got 'two'"):
        config_from_args({"model": "m.pth", "replicas": "two"})
    with pytest.raises(OptionError, match="colour: not an argument"):
        config_from_args({"model": "m.pth", "colour": "red"})
    with pytest.raises(OptionError, match="model: missing"):
        config_from_args({"states": "dir"})


def test_ray_flags_need_ray(tmp_path):
    with pytest.raises(OptionError, match="--replicas: only with --ray"):
        ServeOptions(model="m.pth", replicas=2)
    with pytest.raises(OptionError, match="--replicas: must be at least 1, got 0"):
        ServeOptions(model="m.pth", ray=True, replicas=0)


# -- two replicas on a local Ray instance ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tiny_ckpt, tmp_path_factory):
    """A local Ray instance (2 CPUs) serving 50 states with two replicas; the states directory is shared."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'statetune[ray]')")
    import ray
    from ray import serve

    from statetune.serve.ray_app import RayConfig, build_application
    from statetune.serve.ray_run import init_local
    from statetune.serve.startup import bound_socket

    root = tmp_path_factory.mktemp("ray")
    path = tiny_ckpt("rwkv7")
    model = statetune.load_model(path)
    states = root / "states"
    states.mkdir()
    for k in range(N_STATES):
        statetune.save_state(states / f"s{k}.safetensors", random_state(model, k), model, {"tokenizer": "bytes"},
                             with_shift=True)
    with bound_socket() as sock:
        port = sock.getsockname()[1]
    init_local(2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = RayConfig(model={"model": str(path), "threads": 1},
                           service={"states": str(states), "base_name": "base", "max_batch_size": 16,
                                    "max_loaded_states": 64},
                           replicas=2, api_key=KEY, rescan_s=0.5, grace_period=1.0)
        serve.run(build_application(config), name="statetune", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "model": path, "states": states}
    finally:
        serve.shutdown()
        ray.shutdown()


def post(port: int, path: str, body: dict, key: str = KEY) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                           "Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()


def get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()


def complete(port: int, state: str, prompt: str, stream: bool = False, max_tokens: int = 12):
    return post(port, "/v1/completions", {"model": state, "prompt": prompt, "max_tokens": max_tokens,
                                          "temperature": 0, "stream": stream})


def streamed_text(body: str) -> str:
    events = [e.removeprefix("data: ") for e in body.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]", body[-300:]
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e).get("choices"))


@pytest.mark.slow
def test_answers_equal_a_single_process_server(cluster):
    from openai import OpenAI

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single = Running(ServeOptions(model=str(cluster["model"]), states=str(cluster["states"]), model_name="base",
                                  api_key=KEY))
    try:
        ray_client = OpenAI(base_url=cluster["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
        one = single.client()
        for k in (0, 7, 23, 49):
            kw = dict(model=f"s{k}", prompt=f"prompt {k}", max_tokens=12, temperature=0)
            assert ray_client.completions.create(**kw).choices[0].text == one.completions.create(**kw).choices[0].text
            chat = dict(model=f"s{k}", messages=[{"role": "user", "content": f"hi {k}"}], max_tokens=8,
                        temperature=0, logprobs=True, top_logprobs=2)
            a, b = ray_client.chat.completions.create(**chat), one.chat.completions.create(**chat)
            assert a.choices[0].message.content == b.choices[0].message.content
            assert [t.top_logprobs[0].token for t in a.choices[0].logprobs.content] == \
                [t.top_logprobs[0].token for t in b.choices[0].logprobs.content]
        status, _, body = complete(cluster["port"], "s5", "stream me", stream=True)
        assert status == 200
        assert streamed_text(body) == one.completions.create(model="s5", prompt="stream me", max_tokens=12,
                                                             temperature=0).choices[0].text
        assert [m.id for m in ray_client.models.list()] == [m.id for m in one.models.list()]
        status, _, body = complete(cluster["port"], "nope", "x")
        assert status == 404 and "unknown model 'nope'" in body
        assert post(cluster["port"], "/v1/completions", {"model": "s1", "prompt": "x"}, key="wrong")[0] == 401
        status, _, body = post(cluster["port"], "/tokenize", {"prompt": "abc"})
        assert status == 200 and json.loads(body)["count"] == 3
    finally:
        single.stop()
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_state_stays_on_one_replica(cluster):
    port, names = cluster["port"], [f"s{k}" for k in range(10, 20)]
    for name in names:  # first use: each state is loaded by the replica with the fewest
        assert complete(port, name, "warm up")[0] == 200
    time.sleep(1.5)  # the replicas report what they hold to Ray's router
    where: dict[str, set[str]] = {}
    for _ in range(3):
        for name in names:
            status, headers, _ = complete(port, name, f"again {name}")
            assert status == 200
            where.setdefault(name, set()).add(headers[relay.REPLICA_HEADER])
    assert all(len(replicas) == 1 for replicas in where.values()), where
    assert len(set().union(*where.values())) == 2, "the states were not spread over both replicas"
    pages = scrape_replicas(port)
    hits = sum(_metric(page, "statetune_cache_hits_total") for page in pages.values())
    assert len(pages) == 2 and hits >= len(names) * 2, pages.keys()  # rounds 2 and 3 find round 1's prompt


def scrape_replicas(port: int, tries: int = 60) -> dict[str, str]:
    """``/metrics`` of each replica (a scrape lands on either: scrape until both have answered)."""
    pages: dict[str, str] = {}
    for _ in range(tries):
        status, headers, body = get(port, "/metrics")
        assert status == 200
        pages[headers[relay.REPLICA_HEADER]] = body
        if len(pages) == 2:
            break
    return pages


def _metric(page: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in page.splitlines() if line.startswith(name + " "))


@pytest.mark.slow
def test_created_states_are_served_by_every_replica(cluster):
    port = cluster["port"]
    status, _, body = post(port, "/v1/states", {"name": "mem", "text": "abc"})
    assert status == 400 and "persist" in body
    status, _, body = post(port, "/v1/states", {"name": "made", "text": "abc", "from": "s3", "persist": True})
    assert status == 201, body
    assert (Path(cluster["states"]) / "made.safetensors").is_file()
    status, _, body = complete(port, "made", "hello")
    assert status == 200, body
    seen: dict[str, bool] = {}
    for _ in range(60):  # GET /v1/models lands on either replica: each must list the new state
        _, headers, body = get(port, "/v1/models")
        seen[headers[relay.REPLICA_HEADER]] = "made" in [m["id"] for m in json.loads(body)["data"]]
        if len(seen) == 2 and all(seen.values()):
            break
        time.sleep(0.1)
    assert len(seen) == 2 and all(seen.values()), seen


@pytest.mark.slow
def test_a_killed_replica_costs_only_its_requests(cluster):
    port, results, stop = cluster["port"], [], threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                results.append((time.monotonic(), *complete(port, f"s{20 + i}", f"load {i}", stream=i % 2 == 0,
                                                           max_tokens=40)))
            except OSError as e:
                results.append((time.monotonic(), 0, {}, f"{type(e).__name__}: {e}"))

    workers = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    time.sleep(3)
    victim = replica_pids()[0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    time.sleep(3)
    stop.set()
    for w in workers:
        w.join(90)
    failed = [r for r in results if not ok(r)]
    assert all(r[1] in (200, 503) for r in failed), failed[:3]
    assert all("replica" in r[3] for r in failed), failed[:3]  # a clear error, naming the replica
    assert len(failed) <= 8, failed  # at most the requests in flight on the killed replica
    assert any(ok(r) and r[0] > killed_at for r in results), "nothing was answered after the kill"
    deadline = time.monotonic() + 90
    while len(replica_pids()) < 2 and time.monotonic() < deadline:  # Ray starts a new replica
        time.sleep(1)
    assert len(replica_pids()) == 2 and victim not in replica_pids()
    for k in range(6):
        status, _, body = complete(port, f"s{30 + k}", "after", stream=k % 2 == 0)
        assert status == 200 and '"error"' not in body, body


def ok(result) -> bool:
    _, status, _, body = result
    return status == 200 and '"error"' not in body


def replica_pids() -> list[int]:
    """Processes of this test's state replicas: named ``ray::ServeReplica:statetune:StateReplica`` by Ray,
    children of the raylet this process started."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(
                    b"ray::ServeReplica:statetune:StateReplica") and _parent(_parent(int(proc.name))) == os.getpid():
                pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_ray_flag_without_ray_installed(monkeypatch):
    import importlib.util

    from statetune.serve.ray_run import check_ray

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(OptionError, match=r"--ray: needs Ray Serve: pip install 'statetune\[ray\]'"):
        check_ray()
