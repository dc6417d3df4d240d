"""The CLI: the command table and the parser stay in sync, and every command answers --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from statetune.cli import COMMANDS, build_parser, main


def test_every_command_is_in_the_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


def _all_commands() -> list[list[str]]:
    out = []
    for name, cmd in sorted(COMMANDS.items()):
        out += [[name, sub] for sub in cmd] if isinstance(cmd, dict) else [[name]]
    return out


@pytest.mark.parametrize("argv", _all_commands(), ids=" ".join)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "--threads" in capsys.readouterr().out


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
