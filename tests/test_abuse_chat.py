"""Class 8 of the fault suite: a failed command never ends a chat; the conversation goes on as if the failed
line had not been typed."""

from __future__ import annotations

import io

import torch
from abuse import snapshot, unchanged

import statetune
from statetune.cli import main
from statetune.infer.chat import ChatSession
from statetune.infer.sampling import SamplingParams
from statetune.prompts import CHAT_END
from statetune.runtime import Runtime
from statetune.tokenizer import get_tokenizer


def test_failed_commands_and_bad_bytes_leave_the_session_going(tiny_ckpt, tmp_path, monkeypatch, capsys):
    model = statetune.load_model(tiny_ckpt())
    params = SamplingParams(temperature=0, max_tokens=8, stop=[CHAT_END], stop_token_ids=[0])
    session = ChatSession(Runtime(model, get_tokenizer("bytes"), model.zero_state(1), {}), params)
    expected = [session.reply(m).lstrip(" ") for m in ("hello", "more please")]

    blocker = tmp_path / "file"
    blocker.write_text("keep")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a state at all")
    ints = tmp_path / "ints.pth"
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(2, 8, 8, dtype=torch.int32) for i in range(2)}, ints)
    before = snapshot(blocker, bad, ints)
    script = (b"hello\n"
              + f"/save {blocker}/x.safetensors\n/load {bad}\n/load {ints}\n/load {tmp_path}\n".encode()
              + f"/save {tmp_path}/c.bin\n/save {tmp_path}/c.pth\n".encode()
              + b"caf\xe9 \xff\n"  # Latin-1, not UTF-8
              + b"more please\n")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(script), encoding="utf-8"))
    rc = main(["chat", "--model", str(tiny_ckpt()), "--temperature", "0", "--max-tokens", "8"])
    out, err = capsys.readouterr()
    assert out == f"{expected[0]}\n{expected[1]}\n"  # the state and history survived every failed line
    assert rc == 1 and "Traceback" not in err
    assert f"{blocker} is a file, not a directory" in err
    assert "bad.safetensors: not a readable state file" in err
    assert "expected a floating-point tensor, found torch.int32" in err
    assert "/save: cannot tell the state format from the name" in err
    assert "line 8 is not valid UTF-8" in err
    assert err.count("error:") == 6
    assert (tmp_path / "c.pth").read_bytes()[:2] == b"PK" and not (tmp_path / "c.bin").exists()
    assert unchanged(before) and not list(tmp_path.glob(".*.tmp"))
