"""One writer at a time: the lock module itself, the run folder's lock (two trains into one folder, a killed
run's lock taken over, the lock held through ``--lr auto``, ``--overwrite`` and ``--resume`` refused while a
run writes, torchrun's ranks stopping together), and the locks around other file sets (eval's report pair,
a state the server persists)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import torch

import statetune
from statetune.cli import main
from statetune.commands.train import TrainOptions, train
from statetune.errors import RUNTIME
from statetune.locking import FileLock, LockedError, holder, lock_beside, waiting
from statetune.train import loop
from statetune.train.metrics import read_metrics
from statetune.train.runlock import LOCK, run_lock

REPO = Path(__file__).resolve().parents[1]
BUSY = "another training run is writing to this folder"


# -- the lock module ------------------------------------------------------------------------------------------
def test_second_acquirer_fails_naming_the_holder(tmp_path):
    path = tmp_path / "sub" / "x.lock"
    with FileLock(path, wait=False, busy="{path}: busy, held by {holder}"):
        assert holder(path)["pid"] == os.getpid()
        with pytest.raises(LockedError) as e:
            FileLock(path, wait=False, busy="{path}: busy, held by {holder}").acquire()
        msg = str(e.value)
        assert msg.startswith(f"{path}: busy, held by process {os.getpid()} on {socket.gethostname()}, started ")
        assert "running `" in msg and "\n" not in msg
        assert e.value.exit_code == RUNTIME and e.value.holder["pid"] == os.getpid()
    assert not path.exists() and holder(path) is None  # released: the lock file is gone
    with FileLock(path, wait=False):  # and free for the next one
        pass


def test_release_is_idempotent_and_a_lock_never_taken_releases_nothing(tmp_path):
    lock = FileLock(tmp_path / "x.lock", wait=False)
    lock.release()
    lock.acquire()
    other = FileLock(tmp_path / "x.lock", wait=False)
    other.release()  # never acquired: must not remove the holder's file
    assert holder(tmp_path / "x.lock") is not None
    lock.release()
    lock.release()
    assert holder(tmp_path / "x.lock") is None


def test_a_stale_lock_file_is_taken_over(tmp_path, caplog):
    """A lock file left with a holder's record but no flock (its process died) does not block anyone."""
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"pid": 999_999_999, "host": "gone", "started": "then", "command": "old run"}))
    assert holder(path) is None
    with caplog.at_level(logging.INFO, logger="statetune"), FileLock(path, wait=False):
        assert holder(path)["pid"] == os.getpid()
    assert "taking over the lock left by process 999999999 on gone" in caplog.text
    assert not path.exists()


def test_waiting_lock_takes_turns(tmp_path):
    path = tmp_path / "x.lock"
    order: list[str] = []
    lock = FileLock(path, wait=True).acquire()

    def second() -> None:
        with waiting(path):
            order.append("second")

    t = threading.Thread(target=second)
    t.start()
    order.append("first")
    lock.release()  # removes the file the second may be waiting on: it must lock the path's new file
    t.join(timeout=30)
    assert order == ["first", "second"] and not path.exists()


@pytest.mark.slow
def test_the_kernel_releases_the_lock_of_a_killed_process(tmp_path):
    path = tmp_path / "x.lock"
    code = ("import os, signal, sys; from statetune.locking import FileLock; FileLock(sys.argv[1], wait=False)"
            ".acquire(); print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert p.returncode == -9 and p.stdout == "held\n"
    assert json.loads(path.read_text())["pid"] > 0  # its record stays, its lock does not
    assert holder(path) is None
    with FileLock(path, wait=False):
        assert holder(path)["pid"] == os.getpid()


# -- the run folder ---------------------------------------------------------------------------------------------
def _args(task, out, *extra: str) -> list[str]:
    model, tr, va = task
    return ["train", "--model", str(model), "--train-data", str(tr), "--val-data", str(va), "--out", str(out),
            "--batch-size", "8", "--no-progress", "--threads", "1", *extra]


def _popen(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "statetune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_two_trains_into_one_new_folder_one_wins_and_the_folder_holds_its_run(task, tmp_path):
    """Both started at once: whichever holds the lock is paused (SIGSTOP), so the other meets it for sure;
    the other exits 1 naming the holder and writes nothing; the winner's run is the only one in the folder."""
    out = tmp_path / "run"
    lrs = {"a": "0.5", "b": "2.0"}
    procs = {k: _popen(_args(task, out, "--max-steps", "12", "--save-every", "4", "--eval-every", "6",
                             "--lr", lr, "--seed", str(i + 1))) for i, (k, lr) in enumerate(lrs.items())}
    by_pid = {p.pid: k for k, p in procs.items()}
    deadline = time.monotonic() + 240
    found: dict = {}
    while not found.get("pid") and time.monotonic() < deadline:
        found = holder(out / LOCK) or {}
        time.sleep(0.01)
    assert found.get("pid") in by_pid, found
    winner = by_pid[found["pid"]]
    loser = "b" if winner == "a" else "a"
    os.kill(procs[winner].pid, signal.SIGSTOP)
    try:
        _, err = procs[loser].communicate(timeout=240)
    finally:
        os.kill(procs[winner].pid, signal.SIGCONT)
    assert procs[loser].returncode == 1, err
    assert BUSY in err and f"process {found['pid']} on {socket.gethostname()}" in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1
    _, werr = procs[winner].communicate(timeout=240)
    assert procs[winner].returncode == 0, werr

    steps = [e["step"] for e in read_metrics(out / "metrics.jsonl") if e["type"] == "train"]
    assert steps == list(range(1, 13))  # one run's steps, each once
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["lr"] == float(lrs[winner])
    trained = statetune.load_state(out / "state-final.safetensors").metadata["trained"]
    assert trained["optim"]["lr"] == float(lrs[winner]) and trained["seed"] == config["seed"]
    ck = torch.load(out / "checkpoints" / "step-00000012.pt", weights_only=True)
    lr_12 = [e["lr"] for e in read_metrics(out / "metrics.jsonl") if e["type"] == "train" and e["step"] == 12]
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_12[0])
    assert not (out / LOCK).exists()


@pytest.mark.slow
def test_a_killed_runs_lock_file_is_taken_over_by_resume(task, tmp_path):
    out = tmp_path / "run"
    cut = _popen(_args(task, out, "--max-steps", "6", "--save-every", "2"), env={"STATETUNE_KILL_AT_STEP": "3"})
    _, err = cut.communicate(timeout=240)
    assert cut.returncode == -9, err
    assert json.loads((out / LOCK).read_text())["pid"] == cut.pid  # left behind, but nobody holds it
    resumed = _popen(["train", "--resume", str(out), "--threads", "1"])
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert f"taking over the lock left by process {cut.pid}" in err
    assert (out / "state-final.safetensors").exists() and not (out / LOCK).exists()


@pytest.mark.slow
def test_the_lock_is_held_through_the_lr_search(task, tmp_path, monkeypatch):
    seen: list = []
    real = loop.search_lr

    def watched(*a, **kw):
        seen.append(holder(tmp_path / "run" / LOCK))
        return real(*a, **kw)

    monkeypatch.setattr(loop, "search_lr", watched)
    model, tr, va = task
    opts = TrainOptions(model=str(model), train_data=str(tr), val_data=str(va), out=str(tmp_path / "run"),
                        progress=False, batch_size=8, lr="auto", lr_search_steps=2, lr_search_rates=[1.0],
                        max_steps=2)
    assert train(opts) == 0
    assert len(seen) == 1 and seen[0]["pid"] == os.getpid()
    assert (tmp_path / "run" / "lr_search.json").exists() and not (tmp_path / "run" / LOCK).exists()


@pytest.fixture(scope="module")
def finished(task, tmp_path_factory):
    """A finished two-step run (its files' bytes, to show that a refused run changes none)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_args(task, out, "--max-steps", "2")) == 0
    return out


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["overwrite", "resume", "fresh-into-empty"])
def test_a_run_is_refused_while_another_holds_the_folder(task, finished, tmp_path, capsys, how):
    run = finished if how != "fresh-into-empty" else tmp_path / "empty"
    before = _snapshot(run)
    with run_lock(run):
        argv = {"overwrite": _args(task, run, "--max-steps", "2", "--overwrite"),
                "resume": ["train", "--resume", str(run), "--threads", "1"],
                "fresh-into-empty": _args(task, run, "--max-steps", "2")}[how]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"{'--resume' if how == 'resume' else '--out'} {run}: {BUSY} (process {os.getpid()}" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert {k: v for k, v in _snapshot(run).items() if k != LOCK} == {k: v for k, v in before.items()
                                                                          if k != LOCK}


@pytest.mark.slow
def test_torchrun_ranks_stop_together_when_rank_0_cannot_lock(task, tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "statetune", *_args(task, out, "--max-steps", "2")], capture_output=True,
                           text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    assert BUSY in p.stderr and "rank 1: rank 0 could not start the run" in p.stderr, p.stderr[-3000:]
    assert str(REPO / "statetune") not in p.stderr  # torchrun's own report only: no statetune traceback
    assert sorted(q.name for q in out.iterdir()) == []  # no rank wrote anything


# -- other file sets ------------------------------------------------------------------------------------------
def test_eval_report_pair_is_written_under_its_lock(tmp_path, monkeypatch):
    from statetune.commands import eval as eval_cmd

    out = str(tmp_path / "reports" / "cmp")
    seen: list = []
    real = FileLock.acquire

    def spy(self):
        seen.append(self.path)
        return real(self)

    monkeypatch.setattr(FileLock, "acquire", spy)
    eval_cmd.write_report(out, "# table\n", '{"a": 1}')
    assert seen == [lock_beside(out)]
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["cmp.json", "cmp.md"]  # no lock left


def test_a_persisted_state_never_overwrites_one_another_server_wrote(tmp_path, tiny_ckpt):
    pytest.importorskip("fastapi")
    from statetune.serve.states_api import _persist

    model = statetune.load_model(tiny_ckpt("rwkv7"))
    path = tmp_path / "states" / "mine.safetensors"
    path.parent.mkdir()
    state = model.zero_state(1)
    with waiting(lock_beside(path)):  # the other server writes first; this one waits for it, then sees the file
        t = threading.Thread(target=lambda: seen.append(_persist(path, state, model, {"created_by": "api"})))
        seen: list = []
        t.start()
        path.write_bytes(b"the other server's state")
    t.join(timeout=60)
    assert seen == [False] and path.read_bytes() == b"the other server's state"
    path.unlink()
    assert _persist(path, state, model, {"created_by": "api"}) is True
    assert statetune.load_state(path).metadata["created_by"] == "api"
    assert sorted(p.name for p in path.parent.iterdir()) == ["mine.safetensors"]
