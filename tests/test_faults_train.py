"""Training runs that never lose anything: non-finite steps, damaged checkpoints and logs, changed data, run
folders that already hold a run, and the matching refusals of ``eval``.

Each case runs the real CLI entry point and checks the exit code, the message, that no traceback is printed,
and that the files that must survive are byte-identical afterwards. Most run in-process (the CLI's logging
goes to pytest's log capture there, so warnings are read from ``caplog``); one runs a real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_checkpoint
from train_data import record, write_task

import statetune
from statetune.cli import main
from statetune.train.checkpoint import read_checkpoint
from statetune.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
USAGE = 2
STEPS = ["--max-steps", "4", "--save-every", "2", "--eval-every", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4, on the tiny model and task."""
    root = tmp_path_factory.mktemp("faults")
    model = write_checkpoint(root / "m.pth", "rwkv7", n_layer=2, n_embd=16, head_size=8, vocab_size=300,
                             dim_ffn=40, seed=2)
    tr, va = write_task(root, n_train=32, n_val=8)
    paths = {"model": model, "train": tr, "val": va, "run": root / "run"}
    # through the CLI with --threads 1, as every case below, so resumed runs can be compared bit for bit
    assert main([*fresh_args(paths, paths["run"]), "--threads", "1"]) == 0
    return paths


@pytest.fixture(scope="module")
def runtime_code(base):
    """The CLI's exit code for a runtime error (a missing or damaged file), read off a known one, so that the
    tests pin that train's and eval's runtime errors are classed like every other."""
    code = main(["eval", "plot", str(base["run"] / "nowhere")])
    assert code in (1, 2)
    return code


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A private copy of the base run."""
    return Path(shutil.copytree(base["run"], tmp_path / "run"))


def cli(argv: list[str], capsys, caplog) -> tuple[int, str]:
    """Run the CLI in-process; the exit code and everything it said (stderr and log records)."""
    caplog.clear()
    rc = main([*argv, "--threads", "1"] if argv[0] in ("train", "eval") else argv)
    err = capsys.readouterr().err + caplog.text
    assert "Traceback" not in err
    return rc, err


def fresh_args(base, out: Path) -> list[str]:
    return ["train", "--model", str(base["model"]), "--train-data", str(base["train"]), "--val-data",
            str(base["val"]), "--out", str(out), "--samples", "0", "--no-progress", *STEPS]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def train_steps(run: Path) -> list[int]:
    return [e["step"] for e in read_metrics(run / "metrics.jsonl") if e["type"] == "train"]


def final_wkv(run: Path) -> torch.Tensor:
    return statetune.load_state(run / "state-final.safetensors").state.wkv


# -- class 3: nothing non-finite is written --------------------------------------------------------------------
def test_nan_step_stops_and_leaves_checkpoints_and_states_intact(run, capsys, caplog, monkeypatch, runtime_code):
    kept = {k: v for k, v in snapshot(run).items() if k.startswith("checkpoints/") or k.startswith("state-")}
    monkeypatch.setenv("STATETUNE_KILL_AT_STEP", "6:NAN")
    rc, err = cli(["train", "--resume", str(run), "--max-steps", "8", "--save-every", "4"], capsys, caplog)
    assert rc == runtime_code
    assert "step 6: the trained parameters became non-finite" in err and "step-00000004.pt" in err
    after = snapshot(run)
    assert all(after[k] == v for k, v in kept.items())  # step 2 and 4 checkpoints, best and final state
    assert not (run / "checkpoints" / "step-00000006.pt").exists()
    assert train_steps(run) == [1, 2, 3, 4, 5]  # the failed step is not logged


def test_overflowing_model_stops_at_step_one(base, tmp_path, capsys, caplog, runtime_code):
    sd = torch.load(base["model"], weights_only=True)
    sd["head.weight"] = sd["head.weight"] * 1e38  # logits overflow to inf, the loss is nan
    torch.save(sd, tmp_path / "big.pth")
    rc, err = cli(["train", "--model", str(tmp_path / "big.pth"), "--train-data", str(base["train"]), "--out",
                   str(tmp_path / "out"), "--max-steps", "3", "--no-progress"], capsys, caplog)
    assert rc == runtime_code
    assert "step 1: the training loss is nan" in err and "no checkpoint yet" in err
    assert not list((tmp_path / "out").glob("state-*")) and not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("role", ["train", "val"])
def test_dataset_without_loss_tokens_is_refused(base, tmp_path, capsys, caplog, runtime_code, role):
    silent = tmp_path / "silent.jsonl"
    silent.write_text("".join(json.dumps({**record(w), "mask": [0] * len(record(w)["mask"])}) + "\n"
                              for w in ("ab", "cde")))
    args = fresh_args(base, tmp_path / "out")
    args[args.index(f"--{role}-data") + 1] = str(silent)
    rc, err = cli(args, capsys, caplog)
    assert rc == runtime_code and f"--{role}-data {silent}: no record has a loss token" in err
    assert not (tmp_path / "out" / "state-final.safetensors").exists()


def test_eval_refuses_zero_loss_tokens(base, tmp_path, capsys, caplog, runtime_code):
    silent = tmp_path / "silent.jsonl"
    silent.write_text(json.dumps({"text": [5, 6, 7], "mask": [1, 0, 0]}) + "\n")
    rc, err = cli(["eval", "--model", str(base["model"]), "--data", str(silent)], capsys, caplog)
    assert rc == runtime_code and "no record has a loss token" in err and "perplexity" in err


@pytest.mark.parametrize("flags,match", [(["--max-prompts", "0"], "--max-prompts: must be at least 1, got 0"),
                                         (["--examples", "-1"], "--examples: must not be negative, got -1")])
def test_eval_counts_out_of_range_are_usage_errors(base, capsys, caplog, flags, match):
    rc, err = cli(["eval", "--model", str(base["model"]), "--data", str(base["val"]), "--generate", *flags],
                  capsys, caplog)
    assert rc == USAGE and match in err


def test_eval_generate_without_prompts_is_refused(base, tmp_path, capsys, caplog, runtime_code):
    no_prompt = tmp_path / "np.jsonl"
    no_prompt.write_text(json.dumps({"text": [5, 6, 7], "mask": [1, 1, 1]}) + "\n")
    rc, err = cli(["eval", "--model", str(base["model"]), "--data", str(no_prompt), "--generate"], capsys, caplog)
    assert rc == runtime_code and "--generate: no record" in err and "has a prompt" in err


# -- class 4: resume is robust ---------------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bitflip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 0x10]) + data[101:])
    elif how == "unreadable":  # a directory where the file should be (root reads any file, whatever its mode)
        path.unlink()
        path.mkdir()
    elif how == "not_a_checkpoint":  # checksum matches, but the bytes are not a checkpoint
        path.write_bytes(b"PK\x03\x04 not a torch archive")
        path.with_name(path.name + ".sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  x\n")


@pytest.mark.parametrize("how,reason", [("truncated", "SHA-256"), ("empty", "the file is empty"),
                                        ("bitflip", "does not match"), ("unreadable", "cannot be read"),
                                        ("not_a_checkpoint", "not a readable checkpoint")])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(run, capsys, caplog, how, reason):
    expect = final_wkv(run)
    step2 = (run / "checkpoints" / "step-00000002.pt").read_bytes()
    _damage(run / "checkpoints" / "step-00000004.pt", how)
    rc, err = cli(["train", "--resume", str(run)], capsys, caplog)
    assert rc == 0
    assert "skipping a damaged checkpoint" in err and "step-00000004.pt" in err and reason in err
    assert "resuming from the newest intact checkpoint" in err and "step-00000002.pt" in err
    assert (run / "checkpoints" / "step-00000002.pt").read_bytes() == step2
    assert (run / "checkpoints" / "step-00000004.pt.damaged").exists()
    assert read_checkpoint(run / "checkpoints" / "step-00000004.pt")["step"] == 4  # rewritten, intact
    assert torch.equal(final_wkv(run), expect)  # steps 3-4 redone exactly
    assert train_steps(run) == [1, 2, 3, 4]


def test_no_intact_checkpoint_is_an_error(run, capsys, caplog, runtime_code):
    _damage(run / "checkpoints" / "step-00000004.pt", "truncated")
    _damage(run / "checkpoints" / "step-00000002.pt", "bitflip")
    before = snapshot(run)
    rc, err = cli(["train", "--resume", str(run)], capsys, caplog)
    assert rc == runtime_code and "no intact checkpoint to resume from" in err
    assert "step-00000004.pt" in err and "step-00000002.pt" in err
    assert snapshot(run) == before  # nothing renamed, nothing rewritten


def test_torn_last_metrics_line_is_repaired(run, capsys, caplog):
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"type": "train", "step": 5, "lo')
    assert train_steps(run) == [1, 2, 3, 4]  # readers skip the torn line
    rc, err = cli(["train", "--resume", str(run), "--max-steps", "5"], capsys, caplog)
    assert rc == 0 and "removed a torn last line" in err
    assert train_steps(run) == [1, 2, 3, 4, 5]


def test_damaged_metrics_line_is_an_error_naming_it(run, capsys, caplog, runtime_code):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(run)
    rc, err = cli(["train", "--resume", str(run), "--max-steps", "5"], capsys, caplog)
    assert rc == runtime_code and "metrics.jsonl:3: damaged log line" in err
    assert {k: v for k, v in snapshot(run).items() if k != "config.toml"} == \
        {k: v for k, v in before.items() if k != "config.toml"}


@pytest.mark.parametrize("text,match", [
    (b"lr = [\n", "config.toml is damaged: {cfg} is not valid TOML"),
    (b"learning_rate = 1.0\n", "config.toml is damaged: {cfg}: unknown option 'learning_rate'"),
    (b"batch_size = 0\n", "{cfg} holds an invalid option: --batch-size: must be at least 1, got 0"),
    (b"name = \"\xff\"\n", "config.toml is damaged: "),
], ids=["not_toml", "unknown_key", "invalid_value", "not_utf8"])
def test_corrupt_config_is_an_error(run, capsys, caplog, runtime_code, text, match):
    cfg = run / "config.toml"
    cfg.write_bytes(cfg.read_bytes().replace(b"batch_size = 8\n", b"") + text)
    before = snapshot(run)
    rc, err = cli(["train", "--resume", str(run)], capsys, caplog)
    assert rc == runtime_code and match.format(cfg=cfg) in err
    assert snapshot(run) == before


def test_resume_reads_config_like_config_flag(run, capsys, caplog):
    """Keys spelled as flags (``max-steps``) are read, as ``--config`` reads them, not dropped."""
    cfg = run / "config.toml"
    cfg.write_text(cfg.read_text().replace("max_steps = 4", "max-steps = 5"))
    rc, _ = cli(["train", "--resume", str(run)], capsys, caplog)
    assert rc == 0 and train_steps(run) == [1, 2, 3, 4, 5]


def test_changed_training_data_is_refused(base, run, tmp_path, capsys, caplog, runtime_code):
    changed = tmp_path / "train.jsonl"
    changed.write_bytes(base["train"].read_bytes() + (json.dumps(record("zz")) + "\n").encode())
    before = snapshot(run)
    rc, err = cli(["train", "--resume", str(run), "--train-data", str(changed)], capsys, caplog)
    assert rc == runtime_code and "--train-data train.jsonl changed since" in err and "step-00000004.pt" in err
    assert snapshot(run) == before


def test_changed_model_is_refused(base, run, capsys, caplog, runtime_code):
    """The run's model path holding other weights (as if the file had been replaced in place; here the config
    points at another file, leaving the shared one alone): the checkpoint's fingerprint disagrees."""
    cfg = run / "config.toml"
    other = write_checkpoint(run.parent / "other.pth", "rwkv7", n_layer=2, n_embd=16, head_size=8, vocab_size=300,
                             dim_ffn=40, seed=5)
    cfg.write_text(cfg.read_text().replace(str(base["model"]), str(other)))
    before = snapshot(run)
    rc, err = cli(["train", "--resume", str(run)], capsys, caplog)
    assert rc == runtime_code and "--model is not the base model" in err and "step-00000004.pt" in err
    assert snapshot(run) == before


def test_moved_data_with_the_same_content_resumes(base, run, tmp_path, capsys, caplog):
    moved = tmp_path / "moved.jsonl"
    shutil.copy(base["train"], moved)
    rc, _ = cli(["train", "--resume", str(run), "--train-data", str(moved), "--max-steps", "5"], capsys, caplog)
    assert rc == 0 and train_steps(run) == [1, 2, 3, 4, 5]
    assert f'train_data = "{moved}"' in (run / "config.toml").read_text()


# -- class 5: a run folder means one run ------------------------------------------------------------------------
def test_fresh_train_into_a_run_folder_is_refused(base, run, capsys, caplog):
    before = snapshot(run)
    rc, err = cli(fresh_args(base, run), capsys, caplog)
    assert rc == USAGE and "already holds a training run" in err and f"--resume {run}" in err
    assert "--overwrite" in err
    assert snapshot(run) == before


def test_overwrite_starts_over_and_keeps_other_files(base, run, capsys, caplog):
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "step-00000009.pt").write_bytes(b"old")
    args = fresh_args(base, run)
    args[args.index("--max-steps") + 1] = "2"
    rc, _ = cli([*args, "--overwrite"], capsys, caplog)
    assert rc == 0 and train_steps(run) == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["step-00000002.pt"]
    assert (run / "notes.txt").read_text() == "mine"
    assert "overwrite = true" not in (run / "config.toml").read_text()


@pytest.mark.parametrize("flags,match", [(["--lr", "0.5"], "--lr 0.5 differs from the run's lr = 1.0"),
                                         (["--batch-size", "4"], "--batch-size 4 differs"),
                                         (["--overwrite"], "give one of them"),
                                         (["--max-steps", "3"], "the run would end at step 3, but")])
def test_resume_with_contradicting_options_is_refused(run, capsys, caplog, flags, match):
    before = snapshot(run)
    rc, err = cli(["train", "--resume", str(run), *flags], capsys, caplog)
    assert rc == USAGE and match in err
    if flags[0] not in ("--overwrite", "--max-steps"):
        assert "--max-steps" in err and "may change" in err  # the message lists what may change
    assert snapshot(run) == before


def test_resume_and_out_are_exclusive_flags(run, capsys, caplog):
    """A resumed run stays in its folder: argparse refuses --out beside --resume (a usage error, exit 2)."""
    with pytest.raises(SystemExit) as e:
        cli(["train", "--resume", str(run), "--out", "elsewhere"], capsys, caplog)
    assert e.value.code == USAGE and "not allowed with argument --resume" in capsys.readouterr().err


def test_repeating_the_run_options_on_resume_is_fine(base, run, capsys, caplog):
    args = fresh_args(base, run)
    args[args.index("--max-steps") + 1] = "5"
    args[args.index("--out"):args.index("--out") + 2] = ["--resume", str(run)]
    rc, _ = cli(args, capsys, caplog)
    assert rc == 0 and train_steps(run) == [1, 2, 3, 4, 5]
    assert "max_steps = 5" in (run / "config.toml").read_text()


def test_deleted_checkpoints_restart_without_logging_steps_twice(run, capsys, caplog):
    expect = final_wkv(run)
    shutil.rmtree(run / "checkpoints")
    rc, err = cli(["train", "--resume", str(run)], capsys, caplog)
    assert rc == 0 and "has no checkpoint: the run starts again from step 0" in err
    assert train_steps(run) == [1, 2, 3, 4]
    vals = [e["step"] for e in read_metrics(run / "metrics.jsonl") if e["type"] == "val"]
    assert vals == [0, 2, 4]
    assert torch.equal(final_wkv(run), expect)  # same options, same data: the same run again


@pytest.mark.slow
def test_nan_step_in_a_real_process(base, run, runtime_code):
    """The same guard seen from outside: one line on stderr, no traceback, the runtime exit code."""
    proc = subprocess.run([sys.executable, "-m", "statetune", "train", "--resume", str(run), "--max-steps", "6",
                           "--threads", "1"], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "STATETUNE_KILL_AT_STEP": "5:NAN"})
    assert proc.returncode == runtime_code and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "step 5: the trained parameters became non-finite" in errors[0]
    assert train_steps(run) == [1, 2, 3, 4]
