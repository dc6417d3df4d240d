"""Scoring over the OpenAI API (``logprobs``, ``echo``, ``max_tokens: 0``, several prompts, ``n``) and the
tokenizer endpoints, on a real server: the numbers equal ``statetune eval``'s masked loss, whether the prefix
cache hits or misses, streamed or whole; the shapes are OpenAI's."""

from __future__ import annotations

import json
import math

import jinja2
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_helpers import KEY, Running, random_state  # noqa: E402

import statetune  # noqa: E402
from statetune.cli import main  # noqa: E402
from statetune.commands.serve import ServeOptions  # noqa: E402
from statetune.prompts import chat_prompt  # noqa: E402
from statetune.tokenizer import get_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
BYTES = get_tokenizer("bytes")
TEMPLATE = "Input: {mr}\n\nResponse:"


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    path = tiny_ckpt("rwkv7")
    model = statetune.load_model(path)
    states = root / "states"
    states.mkdir()
    statetune.save_state(states / "tuned.safetensors", random_state(model, 4), model,
                         {"tokenizer": "bytes", "prompt_template": TEMPLATE, "stop": {"text": "\n\n"}}, with_shift=True)
    return {"model": path, "states": states, "root": root}


@pytest.fixture(scope="module")
def server(setup):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    running = Running(ServeOptions(model=str(setup["model"]), states=str(setup["states"]), model_name="base",
                                   api_key=KEY, max_tokens_limit=64, max_prompt_tokens=400, max_batch_size=8))
    yield running
    running.stop()
    torch.set_num_threads(threads)


def eval_loss_sum(setup, tmp_path, context: list[int], continuation: list[int], state: str | None) -> float:
    """``statetune eval``'s summed masked loss of ``continuation`` after ``context``."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": context + continuation,
                                "mask": [0] * len(context) + [1] * len(continuation)}) + "\n")
    args = ["eval", "--model", str(setup["model"]), "--data", str(data), "--out", str(tmp_path / "r")]
    if state:
        args += ["--state", str(setup["states"] / f"{state}.safetensors")]
    assert main(args) == 0
    row = json.loads((tmp_path / "r.json").read_text())["rows"][-1]
    assert row["loss_tokens"] == len(continuation)
    return row["loss"] * row["loss_tokens"]


def harness_request(server, model: str, tokens: list[int], **extra) -> dict:
    """What lm-evaluation-harness's local-completions sends for a loglikelihood request."""
    body = {"model": model, "prompt": tokens, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True, **extra}
    r = server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("state", [None, "tuned"])
def test_echoed_logprobs_sum_to_the_eval_loss(server, setup, tmp_path, state):
    context, continuation = BYTES.encode("The cat sat on"), BYTES.encode(" the mat.")
    tokens = context + continuation
    model = state or "base"
    out = harness_request(server, model, tokens)
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(tokens) + 1  # the prompt, then the one generated token
    assert lp["tokens"][:len(tokens)] == [BYTES.decode([t]) for t in tokens]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert choice["text"].startswith("The cat sat on the mat.")  # echo: prompt text first, never templated
    assert lp["text_offset"][:3] == [0, 1, 2]
    total = sum(lp["token_logprobs"][len(context):-1])
    assert math.isclose(-total, eval_loss_sum(setup, tmp_path, context, continuation, state), rel_tol=1e-4)
    # the harness's greedy check: the chosen token is in the top dict, and the top holds the argmax
    for chosen, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert chosen in top.values() and max(top.values()) >= chosen
    # scoring only: the same numbers, no token generated
    r = server.post("/v1/completions", {"model": model, "prompt": tokens, "max_tokens": 0, "echo": True,
                                        "logprobs": 0})
    only = r.json()["choices"][0]
    assert only["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 0
    assert only["logprobs"]["token_logprobs"] == lp["token_logprobs"][:-1]
    assert only["text"] == "The cat sat on the mat."


def test_a_cache_hit_and_a_miss_score_alike(server):
    messages = [{"role": "user", "content": "Tell me about cats."}]
    first = server.client().chat.completions.create(model="tuned", messages=messages, max_tokens=12, temperature=0,
                                                    logprobs=True, top_logprobs=3)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And dogs?"}]
    before = server.get("/metrics").text
    second = [server.client().chat.completions.create(model="tuned", messages=messages, max_tokens=12,
                                                      temperature=0, logprobs=True, top_logprobs=3)
              for _ in range(2)]
    assert hits(server.get("/metrics").text) > hits(before)  # the later turns read their history from the cache
    a, b = (s.choices[0].logprobs.content for s in second)
    assert [(t.token, t.logprob) for t in a] == [(t.token, t.logprob) for t in b]
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in a)
    assert all(t.bytes == list(t.token.encode()) for t in a if "\\x" not in t.token)
    # an echoed prompt is scored in full whether or not its prefix is cached
    tokens = BYTES.encode(chat_prompt(messages))
    cold = harness_request(server, "tuned", tokens)["choices"][0]["logprobs"]["token_logprobs"]
    warm = harness_request(server, "tuned", tokens)["choices"][0]["logprobs"]["token_logprobs"]
    assert cold == warm


def hits(metrics: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("statetune_cache_hits"))


def test_several_prompts_and_n_choices(server):
    prompts = [BYTES.encode("One"), BYTES.encode("Two words"), BYTES.encode("Three words here")]
    r = server.post("/v1/completions", {"model": "base", "prompt": prompts, "max_tokens": 5, "temperature": 0,
                                        "logprobs": 2, "echo": True})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for p, c in zip(prompts, body["choices"], strict=True):
        alone = harness_request(server, "base", p, max_tokens=5, logprobs=2)["choices"][0]
        assert c["text"] == alone["text"] and c["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
        # batched decoding rounds differently from a batch of one: equal to float32 precision
        got, want = c["logprobs"]["token_logprobs"], alone["logprobs"]["token_logprobs"]
        assert got[0] is None and want[0] is None and got[1:] == pytest.approx(want[1:], rel=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(map(len, prompts))
    sampled = server.client().completions.create(model="base", prompt=["Hello", "Bye"], n=3, max_tokens=8,
                                                 temperature=1.0, seed=7)
    again = server.client().completions.create(model="base", prompt=["Hello", "Bye"], n=3, max_tokens=8,
                                               temperature=1.0, seed=7)
    assert [c.index for c in sampled.choices] == list(range(6))
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # reproducible with a seed
    assert len({c.text for c in sampled.choices[:3]}) > 1  # the n samples of one prompt differ


def test_streamed_logprobs_equal_the_whole_answer(server):
    body = {"model": "tuned", "prompt": "name[Aromi]", "max_tokens": 10, "temperature": 0, "logprobs": 2}
    whole = server.post("/v1/completions", body).json()["choices"][0]
    r = server.post("/v1/completions", {**body, "stream": True})
    events = [json.loads(e[len("data: "):]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    got = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        part = e["choices"][0]["logprobs"]
        for k in got:
            got[k] += part[k] if part else []
    assert got == whole["logprobs"]
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    chat = server.client().chat.completions.create(model="tuned", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                                   stream=True)
    streamed = [t.token for c in chat if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    plain = server.client().chat.completions.create(model="tuned", messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    assert streamed == [t.token for t in plain.choices[0].logprobs.content]


def test_the_template_applies_to_text_but_not_to_echo_raw_or_ids(server):
    def text(**kw):
        return server.post("/v1/completions", {"model": "tuned", "max_tokens": 8, "temperature": 0, **kw}
                           ).json()["choices"][0]["text"]

    templated = text(prompt="name[Aromi]")
    assert text(prompt=BYTES.encode(TEMPLATE.format(mr="name[Aromi]"))) == templated
    assert text(prompt="name[Aromi]", raw=True) == text(prompt=BYTES.encode("name[Aromi]"))
    assert text(prompt="name[Aromi]", echo=True).startswith("name[Aromi]")
    assert text(prompt="name[Aromi]", echo=True) == "name[Aromi]" + text(prompt="name[Aromi]", raw=True)


def test_tokenizer_endpoints(server):
    info = server.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["eos_token_id"] == 0
    text = "Héllo, wörld! 你好"
    ids = server.post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert ids["tokens"] == BYTES.encode(text) and ids["count"] == len(ids["tokens"])
    assert server.post("/tokenize", {"prompt": info["eos_token"]}).json()["tokens"] == [0]
    assert server.post("/detokenize", {"tokens": ids["tokens"]}).json()["prompt"] == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = server.post("/tokenize", {"messages": messages}).json()["tokens"]
    assert chat == BYTES.encode(chat_prompt(messages))
    rendered = jinja2.Environment().from_string(info["chat_template"]).render(messages=messages,
                                                                               add_generation_prompt=True)
    assert rendered == chat_prompt(messages)
    bad = server.post("/detokenize", {"tokens": [1, 99999]})
    assert bad.status_code == 400 and "tokens: token id 99999" in bad.json()["error"]["message"]
    assert server.post("/tokenize", {}).status_code == 400
    assert server.post("/tokenize", {"prompt": "x"}, key=None).status_code == 401  # behind the key like /v1
