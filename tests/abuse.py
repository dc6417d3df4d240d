"""Helpers of the fault-and-abuse tests: run the CLI in-process and check the promise every failure keeps
(one line on stderr with the expected message, the expected exit status, no traceback)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from statetune.cli import main


def fails(capsys, argv: list[str], code: int, *messages: str) -> str:
    """Run ``statetune ARGV``; assert it exits with ``code`` and prints ``messages`` without a traceback."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err, err
    for m in messages:
        assert m in err, err
    return err


def snapshot(*paths: Path) -> dict[Path, bytes]:
    """The bytes of files that must survive a failure unchanged."""
    return {p: p.read_bytes() for p in paths}


def unchanged(before: dict[Path, bytes]) -> bool:
    return all(p.read_bytes() == data for p, data in before.items())


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*.tmp")]


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "64k", options: str = "") -> Iterator[Path]:
    """A tiny tmpfs mounted at ``where`` (skips the test unless it runs as root and may mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
