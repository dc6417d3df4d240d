"""``statetune serve``: a real server on a loopback port, driven by the official ``openai`` client.

Answers must equal ``statetune generate`` (completions) and the engine (chat) for the same state and prompt,
alone or among concurrent requests; bad input is a 4xx that names the problem; the API key, reloading,
client disconnects and a graceful shutdown behave as documented.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from serve_helpers import KEY, Running, random_state, stream_text  # noqa: E402

import statetune  # noqa: E402
from statetune.cli import main  # noqa: E402
from statetune.commands.serve import ServeOptions  # noqa: E402
from statetune.infer.engine import Engine  # noqa: E402
from statetune.infer.sampling import SamplingParams  # noqa: E402
from statetune.prompts import chat_prompt  # noqa: E402
from statetune.tokenizer import get_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
BYTES = get_tokenizer("bytes")
TEMPLATE = "Input: {mr}\n\nResponse:"


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    """A tiny model, two good states (one with a prompt template and stop), a corrupt and a foreign one."""
    root = tmp_path_factory.mktemp("serve")
    path = tiny_ckpt("rwkv7")
    model = statetune.load_model(path)
    states = root / "states"
    states.mkdir()
    statetune.save_state(states / "alpha.safetensors", random_state(model, 1), model, {"tokenizer": "bytes"},
                         with_shift=True)
    statetune.save_state(states / "e2e.safetensors", random_state(model, 2), model,
                         {"tokenizer": "bytes", "prompt_template": TEMPLATE, "stop": {"text": "\n\n"}},
                         with_shift=True)
    (states / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    other = statetune.load_model(tiny_ckpt("rwkv6"))
    statetune.save_state(states / "foreign.safetensors", random_state(other, 3), other, with_shift=True)
    return {"model": path, "states": states, "root": root, "loaded": model}


@pytest.fixture(scope="module")
def server(setup):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    running = Running(ServeOptions(model=str(setup["model"]), states=str(setup["states"]), model_name="base",
                                   api_key=KEY, max_tokens_limit=400, max_prompt_tokens=200, max_batch_size=8))
    yield running
    running.stop()
    torch.set_num_threads(threads)


def generate_cli(capsys, setup, state: str | None, prompt: str, max_tokens: int) -> str:
    capsys.readouterr()
    args = ["generate", "--model", str(setup["model"]), "--prompt", prompt, "--temperature", "0",
            "--max-tokens", str(max_tokens)]
    if state:
        args += ["--state", str(setup["states"] / f"{state}.safetensors")]
    assert main(args) == 0
    return capsys.readouterr().out


def engine_chat(setup, state: str, messages: list[dict], max_tokens: int, **sampling) -> tuple[str, str]:
    model = setup["loaded"]
    sf = statetune.load_state(setup["states"] / f"{state}.safetensors", model)
    engine = Engine(model, BYTES)
    engine.add(BYTES.encode(chat_prompt(messages)), sf.state,
               SamplingParams(temperature=0, max_tokens=max_tokens, stop=["\n\n"], stop_token_ids=[0], **sampling))
    done = None
    while len(engine):
        done = next((d.completion for d in engine.step() if d.completion), done)
    return done.text.lstrip(" "), done.finish_reason


def test_models_health_and_skipped_files(server, caplog):
    ids = [m.id for m in server.client().models.list()]
    assert ids == ["base", "alpha", "e2e"]  # corrupt and foreign (another model's) were skipped
    assert server.client().models.retrieve("e2e").id == "e2e"
    health = server.get("/health", key=None).json()  # open without a key
    assert health["status"] == "ok" and health["models"] == 3


@pytest.mark.parametrize("state,prompt", [("alpha", "Hello there"), ("e2e", "name[Alimentum]"), (None, "Hi")])
def test_completions_equal_generate(server, setup, capsys, state, prompt):
    expect = generate_cli(capsys, setup, state, prompt, 40)
    client = server.client()
    r = client.completions.create(model=state or "base", prompt=prompt, max_tokens=40, temperature=0)
    assert r.choices[0].text == expect
    text = TEMPLATE.format(mr=prompt) if state == "e2e" else prompt
    assert r.usage.prompt_tokens == len(BYTES.encode(text))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    streamed = stream_text(client.completions.create(model=state or "base", prompt=prompt, max_tokens=40,
                                                     temperature=0, stream=True))
    assert streamed == (expect, r.choices[0].finish_reason)


def test_two_states_give_different_answers_and_raw_skips_the_template(server):
    client = server.client()
    a = client.completions.create(model="alpha", prompt="Same prompt", max_tokens=30, temperature=0)
    b = client.completions.create(model="e2e", prompt="Same prompt", max_tokens=30, temperature=0,
                                  extra_body={"raw": True, "stop": []})
    assert a.choices[0].text != b.choices[0].text
    assert b.usage.prompt_tokens == len("Same prompt")


@pytest.mark.parametrize("state", ["alpha", "e2e"])
def test_chat_equals_the_engine_in_the_chat_template(server, setup, state):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!\n\n\nHow are you?"}]
    expect, reason = engine_chat(setup, state, messages, 60)
    client = server.client()
    r = client.chat.completions.create(model=state, messages=messages, max_tokens=60, temperature=0)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expect, reason)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(BYTES.encode(chat_prompt(messages)))
    stream = client.chat.completions.create(model=state, messages=messages, max_tokens=60, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert stream_text(chunks) == (expect, reason)
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    r = server.post("/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 5, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_with_different_states_equal_each_alone(server, setup):
    client = server.client()
    messages = [{"role": "user", "content": "Tell me a story."}]
    jobs = [("alpha", "Once upon", 0.0, None), ("e2e", "name[Blue Spice]", 0.0, None),
            ("alpha", "A different prompt", 1.0, 7), ("e2e", "x", 0.8, 11), ("base", "Zzz", 1.0, 3),
            ("alpha", "chat", 0.0, None), ("e2e", "chat", 1.0, 5), ("base", "chat", 0.0, None)]

    def one(job):
        state, prompt, temperature, seed = job
        if prompt == "chat":
            r = client.chat.completions.create(model=state, messages=messages, max_tokens=50,
                                               temperature=temperature, seed=seed, top_p=0.9)
            return r.choices[0].message.content
        r = client.completions.create(model=state, prompt=prompt, max_tokens=50, temperature=temperature,
                                      seed=seed, top_p=0.9, extra_body={"top_k": 50, "repetition_penalty": 1.1})
        return r.choices[0].text

    alone = [one(j) for j in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(one, jobs))
    assert together == alone
    assert alone[2] != alone[0]  # sampling really sampled something else than greedy


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "nope", "prompt": "x"}, 404, "unknown model 'nope'; available: base, alpha, e2e"),
    ({"model": "../states/alpha", "prompt": "x"}, 404, "unknown model"),
    ({"model": "corrupt", "prompt": "x"}, 404, "unknown model"),
    (b'{"model": "alpha", "prompt": ', 400, "not valid JSON"),
    ([1, 2], 400, "valid dictionary"),
    ({"prompt": "x"}, 400, "model: Field required"),
    ({"model": "alpha", "prompt": "x", "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
    ({"model": "alpha", "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens: Input should be a valid integer"),
    ({"model": "alpha", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "alpha", "prompt": "x", "temperature": -1}, 400, "temperature: must be 0 (greedy) or more"),
    ({"model": "alpha", "prompt": "x", "top_p": 1.5}, 400, "top_p: must be in (0, 1]"),
    ({"model": "alpha", "prompt": "x", "top_k": -3}, 400, "top_k: must be 0 (off) or more"),
    ({"model": "alpha", "prompt": "x", "max_tokens": -1}, 400, "max_tokens: must be 0 (score the prompt only) or more"),
    ({"model": "alpha", "prompt": "x", "seed": -1}, 400, "seed: must be in"),
    ({"model": "alpha", "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": "alpha", "prompt": "x", "stop_token_ids": [5000]}, 400, "stop_token_ids: token id outside"),
    ({"model": "alpha", "prompt": "x" * 500}, 400, "the prompt has 500 tokens; this server accepts at most 200"),
    ({"model": "alpha", "prompt": ""}, 400, "prompt: empty"),
    ({"model": "alpha", "prompt": [1, 999]}, 400, "token id 999 is outside the vocabulary"),
    ({"model": "alpha", "prompt": [[1, 2], [1, 999]]}, 400, "prompt[1]: token id 999 is outside the vocabulary"),
    ({"model": "alpha", "prompt": ["a", ""]}, 400, "prompt[1]: empty"),
    ({"model": "alpha", "prompt": "x", "n": 0}, 400, "n: must be in 1..128"),
    ({"model": "alpha", "prompt": ["a", "b"], "n": 65}, 400, "2 prompts x n=65 choices is over 128"),
    ({"model": "alpha", "prompt": "x", "logprobs": 6}, 400, "logprobs: must be in 0..5"),
    ({"model": "alpha", "prompt": "x", "logprobs": True}, 400, "logprobs: Input should be a valid integer"),
    ({"model": "alpha", "prompt": "x", "suffix": "y"}, 400, "suffix: not supported"),
])
def test_bad_completion_requests_are_4xx_with_a_message(server, body, status, needle):
    r = server.post("/v1/completions", body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


@pytest.mark.parametrize("body,needle", [
    ({"model": "alpha", "messages": []}, "messages: empty"),
    ({"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role: expected one of"),
    ({"model": "alpha", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ({"model": "alpha", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": "alpha", "messages": "hi"}, "messages: Input should be a valid list"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x" * 300}]}, "this server accepts at most 200"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "needs \"logprobs\": true"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs: must be in 0..20"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs: Input should be"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens: must be at"),
])
def test_bad_chat_requests_are_400(server, body, needle):
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_openai_client_raises_its_usual_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="available: base, alpha, e2e"):
        client.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], temperature=-2)
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").models.list()


def test_api_key_and_body_limit(server):
    for key in (None, "wrong"):
        r = server.post("/v1/completions", {"model": "alpha", "prompt": "x"}, key=key)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"] == "Bearer"
    assert server.post("/v1/completions", b"{not json", key=None).status_code == 401  # the key comes first
    assert server.get("/v1/models", key=None).status_code == 401
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:  # announce a huge body: refused before it is read
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(5 << 20).encode()
                  + b"\r\n\r\n{")
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")


def test_max_tokens_is_capped_by_the_server_limit(server):
    r = server.client().completions.create(model="alpha", prompt="Hello", max_tokens=10_000, temperature=0,
                                           extra_body={"stop_token_ids": [], "stop": []})
    assert r.usage.completion_tokens <= 400
    assert r.choices[0].finish_reason == "length" or r.usage.completion_tokens < 400


def test_reload_adds_and_removes_states(server, setup):
    states = setup["states"]
    shutil.copy(states / "alpha.safetensors", states / "gamma.safetensors")
    try:
        r = server.post("/v1/states/reload", {})
        assert r.status_code == 200 and r.json()["added"] == ["gamma"]
        assert {s["file"] for s in r.json()["skipped"]} == {"corrupt.safetensors", "foreign.safetensors"}
        a = server.client().completions.create(model="alpha", prompt="Hi", max_tokens=20, temperature=0)
        g = server.client().completions.create(model="gamma", prompt="Hi", max_tokens=20, temperature=0)
        assert g.choices[0].text == a.choices[0].text
    finally:
        (states / "gamma.safetensors").unlink()
    r = server.post("/v1/states/reload", {})
    assert r.json()["removed"] == ["gamma"] and r.json()["models"] == ["base", "alpha", "e2e"]
    assert server.post("/v1/completions", {"model": "gamma", "prompt": "x"}).status_code == 404


def _wait_idle(server, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while server.service.inflight or server.service.batcher.active:
        assert time.monotonic() < deadline, "the request was not dropped"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_is_dropped_from_the_batch(server, stream):
    body = json.dumps({"model": "alpha", "prompt": "Go on", "max_tokens": 400, "temperature": 0, "stop": [],
                       "stop_token_ids": [], "stream": stream}).encode()
    steps = server.service.batcher.steps
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 5
        while not server.service.inflight:  # the request reached the engine
            assert time.monotonic() < deadline
            time.sleep(0.002)
    _wait_idle(server)
    assert server.service.batcher.steps - steps < 400  # cancelled, not decoded to the end


def test_graceful_shutdown_finishes_short_requests_and_ends_long_streams_cleanly(setup):
    running = Running(ServeOptions(model=str(setup["model"]), states=str(setup["states"]), grace_period=0.5,
                                   max_tokens_limit=100_000))
    client = running.client()
    long_body = {"model": "alpha", "prompt": "Go", "max_tokens": 100_000, "temperature": 0, "stop": [],
                 "stop_token_ids": [], "stream": True}
    resp = running.request("POST", "/v1/completions", long_body, key=None)
    assert resp.readline().startswith(b"data: ")
    short = ThreadPoolExecutor(1).submit(client.completions.create, model="e2e", prompt="x", max_tokens=5)
    deadline = time.monotonic() + 10
    while running.service.inflight < 2 and not short.done():  # the short request is in flight (or done)
        assert time.monotonic() < deadline
        time.sleep(0.005)
    running.server.should_exit = True
    events = [line.decode().strip() for line in resp.readlines() if line.strip()]
    assert events[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(events[-2][6:])["error"]["message"]
    assert short.result(timeout=10).choices[0].finish_reason in ("stop", "length")
    running.thread.join(10)
    assert not running.thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        running.get("/health")


def test_serve_options_are_checked(setup, tmp_path):
    from statetune.errors import OptionError

    with pytest.raises(OptionError, match="--states: not a directory"):
        ServeOptions(model=str(setup["model"]), states=str(tmp_path / "missing"))
    with pytest.raises(OptionError, match="--max-batch-size: must be at least 1"):
        ServeOptions(model=str(setup["model"]), max_batch_size=0)
    opts = ServeOptions(model=str(Path(setup["model"])))
    assert opts.base_name == Path(setup["model"]).stem and opts.host == "127.0.0.1"
