"""Classes 3 (option values) and 6 (the CLI's one error boundary) of the fault suite: every expected failure
is one line on stderr with exit status 2 (usage) or 1 (runtime), a bug still shows its traceback."""

from __future__ import annotations

import contextlib
import json

import pytest
from abuse import fails, no_temp_files, snapshot, tmpfs, unchanged

import statetune
from statetune.cli import main

NON_FINITE = [
    (["--lr", "nan"], "--lr: invalid value 'nan': must be a finite number"),
    (["--lr", "inf"], "--lr: invalid value 'inf'"),
    (["--lr-final", "nan"], "--lr-final: invalid value nan"),
    (["--shift-lr-scale", "nan"], "--shift-lr-scale: invalid value nan"),
    (["--epochs", "nan"], "--epochs: invalid value nan"),
    (["--weight-decay=-inf"], "--weight-decay: invalid value -inf"),
    (["--beta1", "1.5"], "--beta1: AdamW needs a value in [0, 1), got 1.5"),
    (["--beta2", "-0.1"], "--beta2: AdamW needs a value in [0, 1)"),
    (["--seed", "-1"], "--seed: must be in 0.."),
    (["--grad-clip", "-1"], "--grad-clip: must not be negative"),
]


@pytest.mark.parametrize("flags,message", NON_FINITE, ids=[" ".join(f) for f, _ in NON_FINITE])
def test_train_option_values_are_usage_errors(tiny_ckpt, tmp_path, capsys, flags, message):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": [1, 2, 3], "mask": [0, 1, 1]}) + "\n")
    fails(capsys, ["train", "--model", tiny_ckpt(), "--train-data", data, "--out", tmp_path / "run", *flags], 2,
          message)
    assert not (tmp_path / "run").exists()


def test_non_finite_values_everywhere_name_the_flag(tiny_ckpt, tmp_path, capsys):
    model = statetune.load_model(tiny_ckpt())
    statetune.save_state(tmp_path / "a.safetensors", model.zero_state(1), model)
    fails(capsys, ["state", "average", tmp_path / "a.safetensors", tmp_path / "a.safetensors", "--weights", "nan",
                   "1", "--out", tmp_path / "m.safetensors"], 2, "--weights: invalid value [nan, 1.0]")
    fails(capsys, ["generate", "--model", tiny_ckpt(), "--prompt", "x", "--temperature", "inf"], 2,
          "--temperature")
    fails(capsys, ["prepare", tmp_path / "a.safetensors", "--out", tmp_path / "p", "--val-fraction", "nan"], 2,
          "--val-fraction: invalid value nan")
    toml = tmp_path / "c.toml"
    toml.write_text("lr = nan\n")  # valid TOML, not a valid learning rate
    fails(capsys, ["train", "--config", toml, "--model", tiny_ckpt(), "--train-data", toml, "--out",
                   tmp_path / "run"], 2, "--lr: invalid value nan")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "run").exists()


def test_an_argument_that_is_not_utf8_names_its_flag(tiny_ckpt, capsys):
    prompt = b"ab\xff".decode("utf-8", "surrogateescape")  # how Python passes such an argv entry on
    fails(capsys, ["generate", "--model", tiny_ckpt(), "--prompt", prompt], 2, "--prompt:", "not valid UTF-8")


def test_decode_errors_are_one_line(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = [1,\n")
    fails(capsys, ["train", "--config", bad], 2, "is not valid TOML")
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"mr": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    fails(capsys, ["generate", "--model", tiny_ckpt(), "--input", deep, "--out", tmp_path / "o.jsonl",
                   "--prompt-field", "mr"], 1, "deep.jsonl:1", "nested too deeply")
    fails(capsys, ["prepare", deep, "--out", tmp_path / "p", "--workers", "1"], 1, "deep.jsonl:1",
          "nested too deeply")
    assert no_temp_files(tmp_path) and not (tmp_path / "o.jsonl").exists()


def test_unwritable_outputs_are_runtime_errors(tiny_ckpt, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    capture = ["state", "capture", "--model", tiny_ckpt(), "--prompt", "Hi", "--out"]
    fails(capsys, [*capture, blocker / "sub" / "s.safetensors"], 1, f"{blocker} is a file, not a directory")
    assert blocker.read_text() == "keep me"
    with tmpfs(tmp_path / "ro", options="ro") as ro:
        fails(capsys, [*capture, ro / "s.safetensors"], 1, str(ro / "s.safetensors"), "read-only file system")


def test_a_full_disk_replaces_nothing(tiny_ckpt, tmp_path, capsys):
    src = tmp_path / "small.jsonl"
    src.write_text(json.dumps({"prompt": "Q", "completion": " A"}) + "\n")
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"prompt": f"Q{i} " * 20, "completion": " A" * 40}) + "\n" for i in range(300)))
    with tmpfs(tmp_path / "full", size="64k") as disk:
        assert main(["prepare", str(src), "--out", str(disk / "p"), "--tokenizer", "bytes"]) == 0
        before = snapshot(disk / "p.jsonl", disk / "p.meta.json")
        fails(capsys, ["prepare", big, "--out", disk / "p", "--tokenizer", "bytes"], 1, str(disk / "p.jsonl"),
              "no space left on device")
        assert unchanged(before) and no_temp_files(disk)
        (disk / "s.safetensors").write_bytes(b"old state")
        before = snapshot(disk / "s.safetensors")
        with open(disk / "filler", "wb", buffering=0) as fh:  # fill the disk to the last byte
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 512)
        fails(capsys, ["state", "capture", "--model", tiny_ckpt(), "--prompt", "Hi", "--out", disk / "s.safetensors"],
              1, str(disk / "s.safetensors"), "no space left on device")
        assert unchanged(before) and no_temp_files(disk)


def test_debug_shows_the_traceback_and_a_bug_asks_for_a_report(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "none.safetensors"
    err = fails(capsys, ["state", "info", missing], 1, "no such state file")
    assert err.count("\n") == 1  # one line
    capsys.readouterr()
    assert main(["--debug", "state", "info", str(missing)]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["state", "info", str(missing), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("STATETUNE_DEBUG", "1")
    assert main(["state", "info", str(missing)]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("STATETUNE_DEBUG")

    def broken(opts):
        return 1 // 0

    monkeypatch.setattr("statetune.commands.state.info", broken)
    assert main(["state", "info", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "bug in statetune" in err and "report" in err
