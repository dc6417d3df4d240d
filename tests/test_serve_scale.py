"""``statetune serve`` at scale, on a real loopback server: the prefix-state cache over HTTP, many states in
bounded memory, states created over the API, ``/metrics``, the access log, and one request never hurting
another (a broken state fails alone; a lone surrogate is a 400 naming the field).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serve_helpers import KEY, Running, random_state, stream_text  # noqa: E402

import statetune  # noqa: E402
from statetune.commands.serve import ServeOptions  # noqa: E402
from statetune.infer.engine import Engine  # noqa: E402
from statetune.infer.sampling import SamplingParams  # noqa: E402
from statetune.model.state import RWKVState  # noqa: E402
from statetune.prompts import chat_prompt  # noqa: E402
from statetune.serve.ledger import LEDGER  # noqa: E402
from statetune.tokenizer import get_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
BYTES = get_tokenizer("bytes")


def answer(model, prompt: str, state: RWKVState, max_tokens: int, chat: bool = False) -> str:
    """The greedy answer of an engine without cache (chat: in the chat template, as the server answers)."""
    engine = Engine(model, BYTES)
    stops = ["\n\n"] if chat else []
    engine.add(BYTES.encode(prompt), state, SamplingParams(temperature=0, max_tokens=max_tokens, stop=stops,
                                                           stop_token_ids=[0]))
    done = None
    while len(engine):
        done = next((d.completion for d in engine.step() if d.completion), done)
    return done.text.lstrip(" ") if chat else done.text


def metrics(server) -> dict[str, float]:
    """``/metrics`` parsed as Prometheus text: sample name (with labels) → value."""
    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


@pytest.fixture(scope="module")
def world(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    path = tiny_ckpt("rwkv7")
    model = statetune.load_model(path)
    states = root / "states"
    states.mkdir()
    for k, name in enumerate(("alpha", "beta")):
        statetune.save_state(states / f"{name}.safetensors", random_state(model, 10 + k), model,
                             {"tokenizer": "bytes", "trained": {"steps": 5}}, with_shift=True)
    return {"model": path, "loaded": model, "states": states, "root": root}


def opts(world, **kw) -> ServeOptions:
    base = dict(model=str(world["model"]), states=str(world["states"]), model_name="base", api_key=KEY,
                max_tokens_limit=200, max_batch_size=8)
    return ServeOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def server(world):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    running = Running(opts(world))
    yield running
    running.stop()
    torch.set_num_threads(threads)


def state_of(world, name: str) -> RWKVState:
    return statetune.load_state(world["states"] / f"{name}.safetensors", world["loaded"]).state


# -- the prefix-state cache ---------------------------------------------------------------------------------------
def test_chat_follow_ups_hit_the_cache_and_answer_as_without_it(server, world):
    """Two users on two states, four turns each, concurrently: every answer equals the uncached engine's."""
    client, model = server.client(), world["loaded"]
    before = metrics(server)

    def conversation(state: str) -> list[str]:
        history, answers = [], []
        for turn in range(4):
            history.append({"role": "user", "content": f"Question {turn} for {state}?"})
            r = client.chat.completions.create(model=state, messages=history, max_tokens=20, temperature=0)
            text = r.choices[0].message.content
            assert text == answer(model, chat_prompt(history), state_of(world, state), 20, chat=True)
            history.append({"role": "assistant", "content": text})
            answers.append(text)
        return answers

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(conversation, ["alpha", "beta"]))
    after = metrics(server)
    assert after["statetune_cache_hits_total"] - before["statetune_cache_hits_total"] >= 6  # turns 2-4 of both
    assert after["statetune_prefill_tokens_saved_total"] > before["statetune_prefill_tokens_saved_total"]


def test_completions_hit_and_miss_in_one_batch_and_stay_exact(server, world):
    client, model = server.client(), world["loaded"]
    prompts = [("alpha", "A shared beginning, then one"), ("alpha", "A shared beginning, then two"),
               ("beta", "A shared beginning, then one"), ("alpha", "Something else entirely")]
    for state, prompt in prompts[:1]:  # warm: one prompt's states are cached
        client.completions.create(model=state, prompt=prompt, max_tokens=15, temperature=0)

    def one(job):
        state, prompt = job
        return client.completions.create(model=state, prompt=prompt + " more", max_tokens=15,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(one, prompts))
    assert got == [answer(model, p + " more", state_of(world, s), 15) for s, p in prompts]


def test_a_tiny_cache_evicts_and_answers_the_same(world):
    small = Running(opts(world, cache_mb=0.004))  # room for about two states of the tiny model
    try:
        client, model = small.client(), world["loaded"]
        for k in range(6):
            prompt = f"Prompt number {k}"
            r = client.completions.create(model="alpha", prompt=prompt, max_tokens=10, temperature=0)
            assert r.choices[0].text == answer(model, prompt, state_of(world, "alpha"), 10)
        m = metrics(small)
        assert m["statetune_cache_evictions_total"] >= 3 and m["statetune_cache_entries"] <= 3
        assert m["statetune_cache_bytes"] <= m["statetune_cache_budget_bytes"]
    finally:
        small.stop()


def test_reload_of_a_changed_file_serves_the_new_state_not_cached_prefixes(server, world):
    states, model = world["states"], world["loaded"]
    statetune.save_state(states / "gamma.safetensors", random_state(model, 30), model, with_shift=True)
    server.post("/v1/states/reload", {})
    client, prompt = server.client(), "Will this change?"
    first = client.completions.create(model="gamma", prompt=prompt, max_tokens=15, temperature=0).choices[0].text
    try:
        new = random_state(model, 31)
        statetune.save_state(states / "gamma.safetensors", new, model, with_shift=True)
        r = server.post("/v1/states/reload", {}).json()
        assert r["reloaded"] == ["gamma"]
        again = client.completions.create(model="gamma", prompt=prompt, max_tokens=15, temperature=0)
        assert again.choices[0].text == answer(model, prompt, new, 15) != first
    finally:
        (states / "gamma.safetensors").unlink()
        server.post("/v1/states/reload", {})


# -- many states in bounded memory --------------------------------------------------------------------------------
def test_many_states_with_few_loaded_at_once(world, tmp_path):
    """50 states, at most 4 in memory: every answer is its own state's; the LRU stays within bounds."""
    model = world["loaded"]
    d = tmp_path / "many"
    d.mkdir()
    originals = {}
    for k in range(50):
        originals[f"u{k:02d}"] = random_state(model, 100 + k)
        statetune.save_state(d / f"u{k:02d}.safetensors", originals[f"u{k:02d}"], model, with_shift=True)
    running = Running(opts(world, states=str(d), max_loaded_states=4))
    try:
        reg = running.service.registry
        assert reg.loads == 0 and len(reg.names()) == 51  # indexed only: nothing read yet
        names = list(originals) + random.Random(0).sample(list(originals), 10)
        client = running.client()

        def one(name):
            r = client.completions.create(model=name, prompt="Who am I?", max_tokens=8, temperature=0)
            return r.choices[0].text

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(one, names))
        assert got == [answer(model, "Who am I?", originals[n], 8) for n in names]
        assert reg.loaded <= 4 + 1  # the LRU and the base model
        assert reg.loads >= 50 and reg.evictions >= 46
        assert metrics(running)["statetune_loaded_states"] <= 5
    finally:
        running.stop()


def test_two_thousand_state_files_are_indexed_without_reading_them(world, tmp_path):
    model = world["loaded"]
    d = tmp_path / "thousands"
    d.mkdir()
    statetune.save_state(d / "s0000.safetensors", random_state(model, 7), model, with_shift=True)
    data = (d / "s0000.safetensors").read_bytes()
    for k in range(1, 2000):
        (d / f"s{k:04d}.safetensors").write_bytes(data)
    running = Running(opts(world, states=str(d), max_loaded_states=8))
    try:
        reg = running.service.registry
        assert len(reg.names()) == 2001 and reg.loads == 0
        expect = answer(model, "Hi", random_state(model, 7), 8)
        for name in ("s1999", "s0000", "s1234"):
            r = running.client().completions.create(model=name, prompt="Hi", max_tokens=8, temperature=0)
            assert r.choices[0].text == expect
        assert reg.loads == 3
    finally:
        running.stop()


# -- one request never hurts another ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile(world, tmp_path_factory):
    """A server with good states, one whose values overflow the model, and files that fail their checks."""
    model = world["loaded"]
    d = tmp_path_factory.mktemp("hostile")
    for name in ("alpha", "beta"):
        shutil.copy(world["states"] / f"{name}.safetensors", d)
    z = model.zero_state(1)
    huge = RWKVState(*(torch.full_like(t, 3e38) for t in z.tensors()))
    statetune.save_state(d / "overflow.safetensors", huge, model, with_shift=True)
    from safetensors import safe_open
    from safetensors.torch import save_file

    statetune.save_state(d / "nan.safetensors", random_state(model, 5), model, with_shift=True)
    with safe_open(str(d / "nan.safetensors"), "pt") as f:  # save_state refuses NaN: poison the file itself
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["blocks.0.att.time_state"][0, 0, 0] = float("nan")
    save_file(tensors, str(d / "nan.safetensors"), metadata=meta)

    save_file({"blocks.0.att.time_state": z.wkv[0, 0].contiguous(), "blocks.1.att.time_state": z.wkv[1, 0].contiguous(),
               "blocks.0.att.time_shift": z.att_shift[0, 0].contiguous()}, str(d / "halfshift.safetensors"))
    running = Running(opts(world, states=str(d)))
    yield running
    running.stop()


def test_states_that_fail_validation_are_skipped_and_listed(hostile):
    assert hostile.service.registry.names() == ["base", "alpha", "beta", "overflow"]
    listed = hostile.get("/v1/states").json()
    skipped = {s["file"]: s["error"] for s in listed["skipped"]}
    assert "NaN or infinite" in skipped["nan.safetensors"]
    assert "every layer or none" in skipped["halfshift.safetensors"]
    assert hostile.post("/v1/completions", {"model": "nan", "prompt": "x"}).status_code == 404
    r = hostile.post("/v1/states/reload", {}).json()
    assert {s["file"] for s in r["skipped"]} == {"nan.safetensors", "halfshift.safetensors"}


def test_a_broken_state_fails_its_request_alone(hostile, world):
    """Eight concurrent streams, two of them on a state that overflows the model: those two end with an
    error event, every other stream completes with the answer it has alone."""
    model = world["loaded"]
    jobs = [("alpha", "one"), ("overflow", "one"), ("beta", "two"), ("alpha", "three"), ("beta", "four"),
            ("overflow", "five"), ("alpha", "six"), ("beta", "seven")]

    def stream(job):
        state, prompt = job
        r = hostile.request("POST", "/v1/completions", {"model": state, "prompt": prompt, "max_tokens": 30,
                                                         "temperature": 0, "stream": True})
        assert r.status == 200
        events = [e for e in r.read().decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        payloads = [json.loads(e[6:]) for e in events[:-1]]
        if "error" in payloads[-1]:
            return ("error", payloads[-1]["error"]["message"])
        return ("ok", "".join(p["choices"][0]["text"] for p in payloads))

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(stream, jobs))
    for (state, prompt), (kind, text) in zip(jobs, got, strict=True):
        if state == "overflow":
            assert kind == "error" and "not finite" in text
        else:
            assert (kind, text) == ("ok", answer(model, prompt, state_of(world, state), 30))
    r = hostile.post("/v1/completions", {"model": "overflow", "prompt": "x", "max_tokens": 5})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    assert hostile.client().completions.create(model="alpha", prompt="still fine", max_tokens=5).choices


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b'{"model": "alpha", "prompt": "ab\\ud800cd"}', "prompt"),
    ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "ok"}, '
                             b'{"role": "user", "content": "\\udfff"}]}', "messages[1].content"),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "stop": ["\\ud800"]}', "stop"),
    ("/v1/states", b'{"name": "sur", "text": "\\ud83d"}', "text"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(hostile, path, body, param):
    r = hostile.post(path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(f"{param}: not valid Unicode")


# -- token-shift states -------------------------------------------------------------------------------------------
def test_token_shift_vectors_are_served(server, world):
    model, client = world["loaded"], server.client()
    full = state_of(world, "alpha")
    no_shift = RWKVState(torch.zeros_like(full.att_shift), full.wkv, torch.zeros_like(full.ffn_shift))
    got = client.completions.create(model="alpha", prompt="Shift?", max_tokens=25, temperature=0).choices[0].text
    assert got == answer(model, "Shift?", full, 25) != answer(model, "Shift?", no_shift, 25)
    assert client.models.retrieve("alpha").model_extra["token_shift"] is True


# -- states over the API ------------------------------------------------------------------------------------------
def test_create_use_persist_and_delete_states(server, world):
    model, client = world["loaded"], server.client()
    text = "You are a pirate. Speak like one."
    assert server.post("/v1/states", {"name": "pirate", "text": text}, key=None).status_code == 401
    r = server.post("/v1/states", {"name": "pirate", "text": text, "from": "alpha"})
    assert r.status_code == 201, r.text
    assert r.json()["tokens"] == len(BYTES.encode(text)) and r.json()["persisted"] is False
    base = state_of(world, "alpha")
    engine = Engine(model, BYTES)
    engine.add(BYTES.encode(text), base, SamplingParams(temperature=0, max_tokens=1, stop_token_ids=[]),
               keep_state=True)
    captured = None
    while len(engine):
        captured = next((d.completion.state for d in engine.step() if d.completion), captured)
    got = client.completions.create(model="pirate", prompt="Ahoy", max_tokens=20, temperature=0).choices[0].text
    assert got == answer(model, "Ahoy", captured, 20)
    assert server.post("/v1/states", {"name": "pirate", "tokens": [1, 2]}).status_code == 409

    r = server.post("/v1/states", {"name": "kept.v1", "tokens": [5, 6, 7], "persist": True})
    assert r.status_code == 201 and r.json()["file"] == "kept.v1.safetensors"
    path = world["states"] / "kept.v1.safetensors"
    assert path.is_file() and statetune.load_state(path, model).metadata["created_by"] == "api"
    server.post("/v1/states/reload", {})
    assert {"pirate", "kept.v1"} <= set(server.service.registry.names())  # kept over a reload

    assert server.request("DELETE", "/v1/states/alpha").status == 403  # a file state: not the API's to delete
    assert server.request("DELETE", "/v1/states/kept.v1", key=None).status == 401
    for name in ("pirate", "kept.v1"):
        assert server.request("DELETE", f"/v1/states/{name}").status == 200
    assert not path.exists() and server.request("DELETE", "/v1/states/pirate").status == 404
    assert "pirate" not in server.service.registry.names()


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", ".hidden", "", "x" * 65, "sp ace", "dot.safetensors",
                                  "nul\u0000"])
def test_bad_state_names_are_refused(server, world, name):
    r = server.post("/v1/states", {"name": name, "text": "x", "persist": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text
    written = sorted(p.name for p in world["states"].iterdir() if p.name != LEDGER)  # the server's own record
    assert written == ["alpha.safetensors", "beta.safetensors"]


def test_bad_create_requests(server):
    assert "exactly one" in server.post("/v1/states", {"name": "n1"}).json()["error"]["message"]
    assert server.post("/v1/states", {"name": "n1", "tokens": [999]}).json()["error"]["param"] == "tokens"
    assert server.post("/v1/states", {"name": "n1", "text": "x", "from": "nope"}).status_code == 404
    assert server.post("/v1/states", {"name": "alpha", "text": "x"}).status_code == 409


# -- observability ------------------------------------------------------------------------------------------------
def test_metrics_parse_and_move(server):
    before = metrics(server)
    client = server.client()
    r = client.completions.create(model="beta", prompt="Count me", max_tokens=7, temperature=0,
                                  extra_body={"stop_token_ids": [], "stop": []})
    stream_text(client.completions.create(model="beta", prompt="Count me", max_tokens=7, temperature=0,
                                          stream=True, extra_body={"stop_token_ids": [], "stop": []}))
    ok = 'statetune_requests_total{route=/v1/completions,status=200}'
    deadline = time.monotonic() + 5  # an answer is counted once it has been sent: wait for the stream's
    while (after := metrics(server)).get(ok, 0) - before.get(ok, 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert after[ok] - before.get(ok, 0) == 2
    assert after["statetune_generated_tokens_total"] - before["statetune_generated_tokens_total"] == 14
    assert r.usage.completion_tokens == 7
    assert after["statetune_cache_hits_total"] > before["statetune_cache_hits_total"]  # the repeat hit
    assert after["statetune_time_to_first_token_seconds_count"] - before[
        "statetune_time_to_first_token_seconds_count"] == 2
    assert after["statetune_inter_token_latency_seconds_count"] - before[
        "statetune_inter_token_latency_seconds_count"] == 12
    for name in ("statetune_loaded_states", "statetune_queue_length", "statetune_cache_bytes",
                 "statetune_cache_misses_total", "statetune_cache_evictions_total"):
        assert name in after
    assert server.get("/metrics", key=None).status_code == 401  # behind the key like the API


def test_access_log_lines_are_json(world, caplog):
    running = Running(opts(world, access_log=True))
    try:
        with caplog.at_level(logging.INFO, logger="statetune.serve.access"):
            running.client().completions.create(model="alpha", prompt="Log me", max_tokens=4, temperature=0)
            running.post("/v1/completions", {"model": "nope", "prompt": "x"})
            deadline = time.monotonic() + 5  # a line is written once the answer is sent: wait for both
            while len([r for r in caplog.records if r.name == "statetune.serve.access"]) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "statetune.serve.access"]
        ok = next(x for x in lines if x["status"] == 200)
        assert ok["route"] == "/v1/completions" and ok["model"] == "alpha" and ok["prompt_tokens"] == 6
        assert ok["completion_tokens"] == 4 and "ttft_ms" in ok and "cached_tokens" in ok and ok["duration_ms"] >= 0
        assert any(x["status"] == 404 for x in lines)
    finally:
        running.stop()
