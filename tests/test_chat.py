"""``chat``: the state carried across turns equals reading the whole transcript; commands over a pipe."""

from __future__ import annotations

import io

import pytest
import torch

import statetune
from statetune.cli import main
from statetune.infer.chat import ChatSession
from statetune.infer.engine import prefill
from statetune.infer.sampling import SamplingParams
from statetune.model.state import RWKVState
from statetune.prompts import CHAT_END
from statetune.runtime import Runtime
from statetune.tokenizer import get_tokenizer

BYTES = get_tokenizer("bytes")
NEWLINE = BYTES.encode("\n")[0]


class Steered:
    """The model with only printable ASCII allowed, and ``\\n`` forced at chosen generation steps."""

    def __init__(self, model, newline_at: tuple[int, ...] = ()) -> None:
        self.model, self.newline_at, self.calls = model, newline_at, 0
        self.allowed = torch.full((model.config.vocab_size,), -1e9)
        self.allowed[[b + 1 for b in range(32, 127)]] = 0.0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, state, last_only=False):
        logits, state = self.model(tokens, state, last_only=last_only)
        logits = logits + self.allowed
        if self.calls in self.newline_at:
            logits[..., NEWLINE] = 1e9
        self.calls += 1
        return logits, state


def random_state(model, seed: int) -> RWKVState:
    g = torch.Generator().manual_seed(seed)
    s = model.zero_state(1)
    return RWKVState(torch.randn(s.att_shift.shape, generator=g), torch.randn(s.wkv.shape, generator=g) * 0.5,
                     torch.randn(s.ffn_shift.shape, generator=g))


def assert_states_close(a: RWKVState, b: RWKVState) -> None:
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("newline_at,max_tokens,reason", [((3, 4), 40, "stop"), ((), 6, "length")])
def test_state_after_turns_equals_reading_the_transcript(tiny_ckpt, newline_at, max_tokens, reason):
    model = statetune.load_model(tiny_ckpt())
    start = random_state(model, seed=1)
    before = start.clone()
    steered = Steered(model, newline_at)
    session = ChatSession(Runtime(steered, BYTES, start, {}),
                          SamplingParams(temperature=0, max_tokens=max_tokens, stop=[CHAT_END]), system="Be brief.")
    transcript = "System: Be brief.\n\n"
    for message in ("Hi there", "And then?"):
        steered.calls = 0
        reply = session.reply(message)
        assert CHAT_END not in reply and (len(reply) == 3 if reason == "stop" else len(BYTES.encode(reply)) == 6)
        transcript += f"User: {message}\n\nAssistant:{reply}\n\n"
    assert_states_close(session.state, prefill(model, [BYTES.encode(transcript)], start)[1])
    for x, y in zip(start.tensors(), before.tensors(), strict=True):
        assert torch.equal(x, y)  # the caller's state is never modified


def test_reset_save_load(tiny_ckpt, tmp_path):
    model = statetune.load_model(tiny_ckpt())
    session = ChatSession(Runtime(model, BYTES, model.zero_state(1), {}), SamplingParams(temperature=0, max_tokens=8))
    first = session.reply("one")
    session.save(str(tmp_path / "c.safetensors"))
    second = session.reply("two")
    session.reset()
    assert session.reply("one") == first
    session.load(str(tmp_path / "c.safetensors"))
    assert session.turns == 1 and session.reply("two") == second
    sf = statetune.load_state(tmp_path / "c.safetensors", model)
    assert sf.has_shift and sf.metadata["data_format"] == "chat" and sf.metadata["stop"]["text"] == CHAT_END
    assert sf.metadata["format"] == "statetune-state/1"
    assert sf.metadata["prompt_template"] == "User: {user}\n\nAssistant:"


def test_cli_chat_over_a_pipe(tiny_ckpt, tmp_path, monkeypatch, capsys):
    model = statetune.load_model(tiny_ckpt())
    params = SamplingParams(temperature=0, max_tokens=8, stop=[CHAT_END], stop_token_ids=[0])
    session = ChatSession(Runtime(model, BYTES, model.zero_state(1), {}), params)
    r1, r2 = (session.reply(m).lstrip(" ") for m in ("hello", "more please"))
    saved = tmp_path / "conv.safetensors"
    script = f"hello\n/save {saved}\nmore please\n/reset\nhello\n/load {saved}\nmore please\n/nope\n/quit\nignored\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    rc = main(["chat", "--model", str(tiny_ckpt()), "--temperature", "0", "--max-tokens", "8"])
    out, err = capsys.readouterr()
    assert out == f"{r1}\n{r2}\n{r1}\n{r2}\n"
    assert rc == 1 and "unknown command /nope" in err and f"saved the conversation state to {saved}" in err
    assert saved.is_file()
