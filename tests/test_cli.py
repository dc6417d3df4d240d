"""The CLI: every command answers --help with every option and its help text, and errors are one line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from statetune.cli import COMMANDS, main
from statetune.options import flag


def _all_commands() -> list[list[str]]:
    out = []
    for name, cmd in sorted(COMMANDS.items()):
        out += [[name, sub] if sub else [name] for sub in cmd] if isinstance(cmd, dict) else [[name]]
    return out


def _command(argv: list[str]):
    cmd = COMMANDS[argv[0]]
    return cmd[argv[1] if len(argv) > 1 else ""] if isinstance(cmd, dict) else cmd


def _options(cls: type) -> list[dataclasses.Field]:
    """The fields that are options: those of ``cls``, an option group's (a nested dataclass) flattened in."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out += _options(tp) if isinstance(tp, type) and dataclasses.is_dataclass(tp) else [f]
    return out


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("argv", _all_commands(), ids=" ".join)
def test_help_shows_every_option_with_its_help_text(argv, capsys, monkeypatch):
    """Each field of the command's options dataclass appears in its --help as a flag, with its help text."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option, so that help texts are not wrapped
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    opts_cls, _ = _command(argv).load()
    assert "--threads" in out
    for f in _options(opts_cls):
        if f.metadata.get("cli") is False:
            continue
        name = f.name.upper() if f.metadata.get("positional") else flag(f.name)
        assert name in out, f"{' '.join(argv)} --help lacks {name}"
        text = _words(f.metadata["help"]).replace("%%", "%")
        assert text in _words(out), f"{' '.join(argv)} --help lacks the help of {name}: {text!r}"


def test_smoke_runs(capsys):
    assert main(["smoke", "--tokens", "8", "--threads", "1"]) == 0
    assert "smoke: OK" in capsys.readouterr().out


def test_bad_option_names_the_flag(capsys):
    assert main(["smoke", "--arch", "rwkv5"]) == 2
    assert "--arch" in capsys.readouterr().err


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(tiny_ckpt, tmp_path):
    """`statetune ... | head`: once the reader is gone, exit 141 without a traceback."""
    import statetune

    model = statetune.load_model(tiny_ckpt("rwkv7"))
    statetune.save_state(tmp_path / "s.safetensors", model.zero_state(1), model)
    proc = subprocess.Popen([sys.executable, "-m", "statetune", "state", "info", str(tmp_path / "s.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    proc.stdout.close()  # before the child has imported anything, let alone printed
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err
