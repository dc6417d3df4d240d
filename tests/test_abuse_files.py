"""Class 7 of the fault suite: outputs stay atomic. Every destination of a multi-file commit is replaced or
none is, temporary files go on every failure path (SIGTERM included), files get the usual permissions, data
and directory are synced, and temporary files of a killed run are removed by the next one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from abuse import fails, no_temp_files, snapshot, unchanged

from statetune import fileio
from statetune.cli import main
from statetune.fileio import AtomicGroup, atomic_write

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_usual_permissions(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("failure", [ValueError, KeyboardInterrupt, OSError])
def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, failure):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def write(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise failure("boom")

    with pytest.raises(failure):
        atomic_write(target, write)
    assert target.read_text() == "old" and no_temp_files(tmp_path)


def test_data_and_directory_are_synced_around_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "?")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    if synced and synced[0] != "?":
        assert Path(synced[0]).name.startswith(".a.txt.") and Path(synced[1]) == tmp_path
    assert len(synced) == 2


def test_stale_temporary_files_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".a.txt.{dead.pid}.x1.tmp"
    live = tmp_path / f".a.txt.{os.getppid()}.x2.tmp"  # a writer that still runs keeps its file
    other = tmp_path / f".b.txt.{dead.pid}.x3.tmp"  # another destination's: not ours to judge now
    for p in (stale, live, other):
        p.write_text("partial")
    atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    assert not stale.exists() and live.exists() and other.exists()


def test_a_group_commit_is_all_or_nothing(tmp_path, monkeypatch):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "new.json"
    a.write_text("old a")
    b.write_text("old b")
    before = snapshot(a, b)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the third rename of the commit fails: the first two are rolled back
            raise OSError(28, "No space left on device", str(dst))
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OSError), AtomicGroup([a, c, b]) as group:
        for tmp in group.temps:
            tmp.write_text("new")
    assert unchanged(before) and not c.exists() and no_temp_files(tmp_path)


def test_prepare_replaces_every_output_or_none(tmp_path, capsys, monkeypatch):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": " A"}) + "\n" for i in range(40)))
    out = tmp_path / "p"
    assert main(["prepare", str(src), "--out", str(out), "--tokenizer", "bytes", "--val-fraction", "0.2"]) == 0
    before = snapshot(*(tmp_path / n for n in ("p.jsonl", "p.val.jsonl", "p.meta.json")))
    src.write_text(src.read_text() + '{"prompt": "late bad record"\n')
    fails(capsys, ["prepare", src, "--out", out, "--tokenizer", "bytes", "--val-fraction", "0.2"], 1, "d.jsonl:41")
    assert unchanged(before) and no_temp_files(tmp_path)
    src.write_text(src.read_text().rsplit("\n", 2)[0] + "\n")
    real = os.replace

    def replace(src_, dst):
        if str(dst).endswith(".meta.json"):
            raise PermissionError(13, "Permission denied", str(dst))
        real(src_, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    fails(capsys, ["prepare", src, "--out", out, "--tokenizer", "bytes", "--val-fraction", "0.2"], 1,
          "p.meta.json: Permission denied")
    assert unchanged(before) and no_temp_files(tmp_path)


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(tiny_ckpt, tmp_path):
    """A run terminated mid-write exits 143 with one line, its temporary file gone, the old output intact."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"p": f"record {i}"}) + "\n" for i in range(400)))
    out = tmp_path / "out.jsonl"
    out.write_text("the previous run's output\n")
    proc = subprocess.Popen([sys.executable, "-m", "statetune", "generate", "--model", str(tiny_ckpt()), "--input",
                             str(src), "--prompt-field", "p", "--out", str(out), "--max-tokens", "200",
                             "--batch-size", "1", "--threads", "1"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.jsonl.*.tmp")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "statetune generate: terminated" in err and "Traceback" not in err
    assert out.read_text() == "the previous run's output\n" and no_temp_files(tmp_path)
