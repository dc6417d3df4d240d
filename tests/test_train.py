"""``statetune train`` end to end on a tiny model: learning, parameterisations, init, resume, data parallel."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_checkpoint
from safetensors import safe_open

import statetune
from statetune.cli import main
from statetune.commands.train import TrainOptions, train
from statetune.train.metrics import read_metrics
from statetune.tuning.config import StateTuningConfig

REPO = Path(__file__).resolve().parents[1]


def run(task, out, **kw) -> TrainOptions:
    model, tr, va = task
    opts = TrainOptions(model=str(model), train_data=str(tr), val_data=str(va), out=str(out), progress=False,
                        batch_size=8, **kw)
    assert train(opts) == 0
    return opts


def val_losses(out) -> list[float]:
    return [e["loss"] for e in read_metrics(Path(out) / "metrics.jsonl") if e["type"] == "val"]


@pytest.mark.slow
def test_direct_state_learns_and_beats_zero_state(task, tmp_path):
    run(task, tmp_path, max_steps=40, eval_every=20)
    losses = val_losses(tmp_path)
    assert losses[-1] < losses[0] - 1.0  # losses[0] is the zero-state baseline
    sf = statetune.load_state(tmp_path / "state-best.safetensors", statetune.load_model(task[0]))
    assert sf.metadata["tokenizer"] == "bytes" and sf.metadata["trained"]["steps"] == 40
    assert not sf.has_shift and (tmp_path / "state-final.safetensors").exists()
    events = read_metrics(tmp_path / "metrics.jsonl")
    assert any(e["type"] == "sample" for e in events)
    assert (tmp_path / "config.toml").read_text().count("max_steps = 40") == 1


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_encoder_learns(task, tmp_path, scope):
    run(task, tmp_path, param="encoder", encoder_scope=scope, encoder_in=8, encoder_hidden=32, max_steps=30,
        eval_every=30)
    losses = val_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.5


def test_tune_shift_saves_shift_states(task, tmp_path):
    run(task, tmp_path, tune_shift=True, max_steps=5, eval_every=5)
    sf = statetune.load_state(tmp_path / "state-final.safetensors")
    assert sf.has_shift and sf.state.att_shift.abs().sum() > 0


def test_shift_lr_scale_sets_the_shift_states_rate(task, tmp_path):
    run(task, tmp_path / "frozen", tune_shift=True, shift_lr_scale=0.0, max_steps=3, eval_every=5)
    frozen = statetune.load_state(tmp_path / "frozen" / "state-final.safetensors").state
    assert frozen.att_shift.abs().sum() == 0 and frozen.ffn_shift.abs().sum() == 0  # rate 0: never moved
    assert frozen.wkv.abs().sum() > 0
    run(task, tmp_path / "full", tune_shift=True, max_steps=3, eval_every=5)
    run(task, tmp_path / "tenth", tune_shift=True, shift_lr_scale=0.1, max_steps=3, eval_every=5)
    full = statetune.load_state(tmp_path / "full" / "state-final.safetensors").state
    tenth = statetune.load_state(tmp_path / "tenth" / "state-final.safetensors").state
    # Adam's first steps move each entry by about the rate: a tenth of the rate, about a tenth of the distance
    ratio = (tenth.att_shift.abs().mean() / full.att_shift.abs().mean()).item()
    assert 0.05 < ratio < 0.2, ratio


def test_init_from_file_and_from_prompt(task, tmp_path):
    run(task, tmp_path / "a", max_steps=5, eval_every=5)
    first = statetune.load_state(tmp_path / "a" / "state-final.safetensors").state
    run(task, tmp_path / "b", max_steps=2, eval_every=5, init=str(tmp_path / "a" / "state-final.safetensors"),
        lr=0.0, lr_final=0.0)
    cont = statetune.load_state(tmp_path / "b" / "state-final.safetensors").state
    torch.testing.assert_close(cont.wkv, first.wkv)

    run(task, tmp_path / "c", max_steps=1, eval_every=5, init="prompt", init_prompt="Q: x\nA: ok!\n", lr=0.0,
        lr_final=0.0)
    model = statetune.load_model(task[0])
    _, expect = model(torch.tensor([[b + 1 for b in b"Q: x\nA: ok!\n"]]))
    got = statetune.load_state(tmp_path / "c" / "state-final.safetensors")
    assert got.has_shift  # a prompt's state includes its token-shift vectors
    torch.testing.assert_close(got.state.wkv, expect.wkv)


def test_long_sequences_are_cut_into_segments(task, tmp_path):
    """A short --ctx-len cuts every record into segments with the state carried over: with full BPTT that
    changes neither the loss nor the gradient, so both runs log the same losses and end at the same state."""
    run(task, tmp_path / "whole", max_steps=3, eval_every=3)
    run(task, tmp_path / "cut", max_steps=3, eval_every=3, ctx_len=5)
    events = {name: read_metrics(tmp_path / name / "metrics.jsonl") for name in ("whole", "cut")}
    train_loss = {name: [e["loss"] for e in ev if e["type"] == "train"] for name, ev in events.items()}
    assert train_loss["cut"] == pytest.approx(train_loss["whole"], rel=1e-5)
    assert val_losses(tmp_path / "cut") == pytest.approx(val_losses(tmp_path / "whole"), rel=1e-5)
    full = [e for e in events["cut"] if e["type"] == "val"][-1]["loss_tokens"]
    assert full == 16 * 6  # every loss token of the validation set counted, none truncated
    model = statetune.load_model(task[0])
    whole, cut = (statetune.load_state(tmp_path / n / "state-final.safetensors", model).state for n in ("whole", "cut"))
    torch.testing.assert_close(cut.wkv, whole.wkv, rtol=1e-4, atol=1e-5)


def test_state_file_says_how_it_was_made(task, tmp_path):
    """The state file's ``trained`` metadata holds the full tuning config (rebuilt equal), the optimiser and
    schedule settings, the steps and the data's fingerprint, like PEFT's adapter_config.json."""
    opts = run(task, tmp_path, max_steps=2, eval_every=2, param="encoder", encoder_in=4, encoder_hidden=8,
               tune_shift=True, shift_lr_scale=0.5, init="prompt", init_prompt="Q: ", lr=0.5, warmup_steps=1)
    trained = statetune.load_state(tmp_path / "state-final.safetensors").metadata["trained"]
    assert StateTuningConfig.from_dict(trained["tuning"]) == opts.tuning
    assert trained["tuning"]["encoder_hidden"] == 8 and trained["tuning"]["init_prompt"] == "Q: "
    assert trained["optim"] == dataclasses.asdict(opts.optim) and trained["optim"]["lr"] == 0.5
    assert trained["schedule"] == dataclasses.asdict(opts.schedule) and trained["steps"] == 2
    assert trained["data_fingerprint"]["train"]["sha256"] == hashlib.sha256(task[1].read_bytes()).hexdigest()
    raw = safe_open(str(tmp_path / "state-final.safetensors"), "pt").metadata()["trained"]
    assert raw == json.dumps(json.loads(raw), sort_keys=True)  # sorted JSON, as the format promises


def test_ema_saves_the_moving_average_and_leaves_training_alone(task, tmp_path):
    """``--ema 0.8``: the optimizer's trajectory is that of a run without it (same checkpoints), and
    state-final is the average of that trajectory, warmed-up decay min(0.8, (1 + t) / (10 + t)) after step t."""
    common = dict(max_steps=6, eval_every=6, save_every=1, keep_checkpoints=10, warmup_steps=1)
    run(task, tmp_path / "plain", **common)
    run(task, tmp_path / "ema", ema=0.8, **common)
    ema = torch.zeros(1)
    for t in range(1, 7):
        plain = torch.load(tmp_path / "plain" / "checkpoints" / f"step-{t:08d}.pt", weights_only=True)
        averaged = torch.load(tmp_path / "ema" / "checkpoints" / f"step-{t:08d}.pt", weights_only=True)
        raw = averaged["tunable"]["wkv"]
        torch.testing.assert_close(raw, plain["tunable"]["wkv"], rtol=0, atol=0)
        decay = min(0.8, (1 + t) / (10 + t))
        ema = decay * ema + (1 - decay) * raw
    final = statetune.load_state(tmp_path / "ema" / "state-final.safetensors").state
    torch.testing.assert_close(final.wkv, ema, rtol=1e-5, atol=1e-6)
    unaveraged = statetune.load_state(tmp_path / "plain" / "state-final.safetensors").state
    assert not torch.allclose(final.wkv, unaveraged.wkv)
    trained = statetune.load_state(tmp_path / "ema" / "state-final.safetensors").metadata["trained"]
    assert trained["optim"]["ema"] == 0.8


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "statetune", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("fault,returncode,extra", [("7", -9, []), ("7:INT", 130, []), ("7", -9, ["--ema", "0.9"])],
                         ids=["sigkill", "ctrl-c", "sigkill-ema"])
def test_interrupted_run_resumes_exactly(task, tmp_path, fault, returncode, extra):
    """Killed (SIGKILL: resume from the step-4 checkpoint) or interrupted (Ctrl-C: a checkpoint is saved at
    step 7, off the schedule), the resumed run ends with the same state as an uninterrupted one."""
    model, tr, va = task
    common = ["train", "--model", str(model), "--train-data", str(tr), "--val-data", str(va), "--max-steps", "12",
              "--batch-size", "8", "--eval-every", "5", "--save-every", "4", "--no-progress", "--threads", "1",
              *extra]
    assert _cli([*common, "--out", str(tmp_path / "full")]).returncode == 0
    cut = _cli([*common, "--out", str(tmp_path / "cut")], env={"STATETUNE_KILL_AT_STEP": fault})
    assert cut.returncode == returncode, cut.stderr
    assert not (tmp_path / "cut" / "state-final.safetensors").exists()
    saved_at_7 = (tmp_path / "cut" / "checkpoints" / "step-00000007.pt").exists()
    assert saved_at_7 == (returncode == 130)
    if returncode == 130:
        assert "interrupted at step 7" in cut.stderr and "--resume" in cut.stderr
    resumed = _cli(["train", "--resume", str(tmp_path / "cut"), "--threads", "1"])
    assert resumed.returncode == 0, resumed.stderr
    a = statetune.load_state(tmp_path / "full" / "state-final.safetensors").state
    b = statetune.load_state(tmp_path / "cut" / "state-final.safetensors").state
    assert torch.equal(a.wkv, b.wkv)
    steps = [e["step"] for e in read_metrics(tmp_path / "cut" / "metrics.jsonl") if e["type"] == "train"]
    assert steps == list(range(1, 13))  # nothing logged twice after the resume


@pytest.mark.slow
@pytest.mark.parametrize("tune_shift", [False, True])
def test_resume_from_a_checkpoint_without_lr_scale(task, tmp_path, tune_shift):
    """Checkpoints written before the shift states had their own optimizer group: a plain run resumes; a
    --tune-shift run (one group then, two now) is refused with a clear error instead of a traceback."""
    model, tr, va = task
    args = ["train", "--model", str(model), "--train-data", str(tr), "--max-steps", "4", "--save-every", "2",
            "--no-progress", "--threads", "1", "--out", str(tmp_path / "run")] + (["--tune-shift"] * tune_shift)
    assert _cli(args, env={"STATETUNE_KILL_AT_STEP": "3"}).returncode == -9
    path = tmp_path / "run" / "checkpoints" / "step-00000002.pt"
    ck = torch.load(path, weights_only=True)
    groups = ck["optimizer"]["param_groups"]
    old = {k: v for k, v in groups[0].items() if k != "lr_scale"}
    old["params"] = [i for g in groups for i in g["params"]]
    ck["optimizer"]["param_groups"] = [old]
    torch.save(ck, path)
    path.with_name(path.name + ".sha256").unlink()  # older statetune wrote no checksum
    resumed = _cli(["train", "--resume", str(tmp_path / "run"), "--threads", "1"])
    if tune_shift:
        assert resumed.returncode == 1 and "older statetune" in resumed.stderr and "Traceback" not in resumed.stderr
    else:
        assert resumed.returncode == 0, resumed.stderr
        assert (tmp_path / "run" / "state-final.safetensors").exists()


@pytest.mark.slow
def test_two_processes_match_one(task, tmp_path):
    model, tr, va = task
    common = ["--model", str(model), "--train-data", str(tr), "--max-steps", "4", "--no-progress",
              "--save-every", "100"]
    one = _cli(["train", *common, "--batch-size", "4", "--out", str(tmp_path / "one"), "--threads", "1"])
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "statetune", "train", *common, "--batch-size", "2", "--out", str(tmp_path / "two"),
                          "--threads", "1"], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a = statetune.load_state(tmp_path / "one" / "state-final.safetensors").state
    b = statetune.load_state(tmp_path / "two" / "state-final.safetensors").state
    torch.testing.assert_close(a.wkv, b.wkv, atol=1e-5, rtol=1e-4)
    assert a.wkv.abs().sum() > 0


@pytest.mark.parametrize("case,match", [
    ("missing_model", "no such checkpoint file"),
    ("missing_data", "no such dataset file"),
    ("bad_vocab", "outside the model's vocabulary"),
    ("empty", "the dataset is empty"),
    ("other_model_state", "different base model"),
    ("bad_flag", "--batch-size"),
    ("negative_shift_rate", "--shift-lr-scale: must not be negative"),
])
def test_documented_errors(task, tmp_path, capsys, case, match):
    model, tr, va = task
    args = {"--model": str(model), "--train-data": str(tr), "--out": str(tmp_path / "run"), "--max-steps": "1"}
    if case == "missing_model":
        args["--model"] = str(tmp_path / "none.pth")
    elif case == "missing_data":
        args["--train-data"] = str(tmp_path / "none.jsonl")
    elif case == "bad_vocab":
        (tmp_path / "d.jsonl").write_text(json.dumps({"text": [1, 2, 999], "mask": [0, 1, 1]}) + "\n")
        args["--train-data"] = str(tmp_path / "d.jsonl")
    elif case == "empty":
        (tmp_path / "d.jsonl").write_text("\n")
        args["--train-data"] = str(tmp_path / "d.jsonl")
    elif case == "other_model_state":
        other = write_checkpoint(tmp_path / "o.pth", "rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=300,
                                 dim_ffn=64, seed=9)
        m = statetune.load_model(other)
        statetune.save_state(tmp_path / "s.safetensors", m.zero_state(1), m)
        args["--init"] = str(tmp_path / "s.safetensors")
    elif case == "bad_flag":
        args["--batch-size"] = "0"
    elif case == "negative_shift_rate":
        args["--shift-lr-scale"] = "-1"
    argv = ["train"] + [x for kv in args.items() for x in kv] + ["--no-progress"]
    assert main(argv) == (2 if case in ("bad_flag", "negative_shift_rate") else 1)  # usage 2, runtime 1
    assert match in capsys.readouterr().err
