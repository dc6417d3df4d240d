"""The pretraining script's budget-driven loop (``scripts/pretrain/loop.py``): its pacing, and that a killed
run resumes from its last saved state instead of starting again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from pretrain.loop import STATE_FILE, Pace  # noqa: E402
from pretrain.options import build_parser  # noqa: E402

TINY = ["--n-layer", "1", "--n-embd", "64", "--head-size", "32", "--batch", "2", "--ctx", "16", "--warmup", "2",
        "--measure-steps", "2", "--replan-every", "5", "--log-every", "1", "--val-windows", "2", "--threads", "1"]
RUN = ("import sys; sys.path.insert(0, sys.argv[1]); from pretrain.loop import train; "
       "from pretrain.options import build_parser; train(build_parser().parse_args(sys.argv[2:]))")


def test_pace_plans_the_budget_and_ends_the_cosine_with_it() -> None:
    args = build_parser().parse_args(["--measure-steps", "3", "--replan-every", "10", "--warmup", "2"])
    pace, budget, dt = Pace(), 20.0, 0.1
    seen = []
    while pace.progress < 1.0 and pace.step < 10_000:
        pace.step += 1
        pace.advance([dt] * 5, budget - pace.step * dt, args)
        seen.append(pace.progress)
        if pace.step < 3:
            assert pace.sec_per_step is None and pace.planned is None  # nothing is planned before measuring
    per_step = dt * 1.03 + 0.02
    assert pace.sec_per_step == pytest.approx(per_step)
    # the cosine reaches its end about when the budget runs out, never jumping backwards on the way
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False))
    assert budget / per_step * 0.9 < pace.step <= budget / dt
    assert pace.progress == 1.0


def test_a_replan_changes_the_pace_of_the_decay_without_a_jump() -> None:
    args = build_parser().parse_args(["--measure-steps", "2", "--replan-every", "4", "--warmup", "0"])
    pace = Pace()
    for step_time in [0.1] * 8 + [0.4] * 8:          # the machine slows down halfway
        pace.step += 1
        before = pace.progress
        pace.advance([step_time] * 3, 100.0 - pace.step * 0.2, args)
        assert 0.0 <= pace.progress - before < 0.05
    assert pace.sec_per_step == pytest.approx(0.4 * 1.03 + 0.02)


def _corpus(tmp: Path) -> Path:
    corpus = tmp / "corpus"
    corpus.mkdir()
    text = "".join(f"The restaurant number {i} serves food near the river.\n\n" for i in range(400))
    (corpus / "train.txt").write_text(text)
    (corpus / "val.txt").write_text(text[:4000])
    return corpus


def _start(corpus: Path, work: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", RUN, str(REPO / "scripts"), "--corpus", str(corpus), "--work-dir", str(work),
           *TINY, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_killed_pretraining_run_resumes_from_its_saved_state(tmp_path: Path) -> None:
    corpus, work = _corpus(tmp_path), tmp_path / "work"
    state = work / STATE_FILE
    proc = _start(corpus, work, "--minutes", "5", "--save-every-min", "0.005", "--eval-every-min", "10")
    deadline = time.monotonic() + 120
    while not state.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "rerun with --resume" in out
    killed = torch.load(state, weights_only=True)
    assert killed["step"] > 0 and not killed["done"]

    proc = _start(corpus, work, "--minutes", "5", "--save-every-min", "10", "--eval-every-min", "10", "--resume")
    lines = []
    for line in proc.stdout:           # stop the second leg too, a few steps after it resumed: it saves again
        lines.append(line)
        if line.startswith(f"step {killed['step'] + 3}/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert f"resumed from {state}: step {killed['step']}" in out, out
    resumed = torch.load(state, weights_only=True)
    assert resumed["step"] >= killed["step"] + 3
    assert resumed["elapsed"] > killed["elapsed"]
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == sorted(set(steps)), "the metrics log repeats or loses steps across the resume"


@pytest.mark.slow
def test_resuming_at_another_model_size_is_refused_naming_the_field(tmp_path: Path) -> None:
    corpus, work = _corpus(tmp_path), tmp_path / "work"
    proc = _start(corpus, work, "--minutes", "0.02", "--eval-every-min", "10")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "training done" in out
    done = _start(corpus, work, "--minutes", "0.02", "--resume")
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 0 and "training already finished" in out, out
    other = [a if a != "64" else "128" for a in TINY]
    cmd = [sys.executable, "-c", RUN, str(REPO / "scripts"), "--corpus", str(corpus), "--work-dir", str(work),
           *other, "--minutes", "0.02", "--resume"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "n_embd=64, not 128" in res.stderr
    assert "Traceback" not in res.stderr
