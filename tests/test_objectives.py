"""Training objectives beyond SFT: the DPO, ORPO and distillation losses on hand-computed values, their
gradients through the segment loop against float64 finite differences, short runs that lower each loss,
exact resume, the preference data format, and the documented errors."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import write_checkpoint
from train_data import record, write_task

import statetune
from statetune.cli import main
from statetune.commands.train import TrainOptions, train
from statetune.data.pairs import PreferenceDataset, data_kind
from statetune.errors import DataError
from statetune.model.state import RWKVState
from statetune.objectives import ObjectiveConfig, Segmenting
from statetune.objectives.distill import DistillObjective, distill_loss
from statetune.objectives.dpo import dpo_loss
from statetune.objectives.orpo import odds_ratio_loss, orpo_loss
from statetune.objectives.preference import PreferenceObjective
from statetune.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
T = torch.tensor


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the losses on hand-computed values ------------------------------------------------------------------


def test_dpo_loss_by_hand():
    # pair 0: the policy moved 1 nat toward chosen and 1 away from rejected: logits 2, loss log(1 + e^-0.2)
    # pair 1: policy equals reference: loss log 2, rewards 0
    losses, rc, rr = dpo_loss(T([-1.0, -5.0]), T([-3.0, -4.0]), T([-2.0, -5.0]), T([-2.0, -4.0]), beta=0.1)
    torch.testing.assert_close(losses, T([0.5981388693815918, 0.6931471805599453]))
    torch.testing.assert_close(rc, T([0.1, 0.0]))
    torch.testing.assert_close(rr, T([-0.1, 0.0]))


def test_odds_ratio_by_hand():
    # mean log-probs log 0.5 and log 0.25: odds 1 and 1/3, log odds ratio log 3, term -0.1 log sigmoid(log 3)
    c, r = T([math.log(0.5)], dtype=torch.float64), T([math.log(0.25)], dtype=torch.float64)
    terms, rc, rr, log_odds = odds_ratio_loss(c, r, orpo_lambda=0.1)
    torch.testing.assert_close(log_odds, T([math.log(3.0)], dtype=torch.float64))
    torch.testing.assert_close(terms, T([0.1 * math.log(4 / 3)], dtype=torch.float64))
    torch.testing.assert_close(rc, 0.1 * c)
    torch.testing.assert_close(rr, 0.1 * r)
    # from sums: chosen 2 tokens at 0.5 each, rejected 3 at 0.25 each; NLL over the chosen tokens is log 2
    total = orpo_loss(2 * c, 3 * r, T([2.0], dtype=torch.float64), T([3.0], dtype=torch.float64), 0.1,
                      n_pairs=1, n_chosen_tokens=2)
    torch.testing.assert_close(total, T(math.log(2) + 0.1 * math.log(4 / 3), dtype=torch.float64))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distill_loss_by_hand(temperature):
    # student uniform over 2 tokens; teacher logits (log 3, 0): p = (3/4, 1/4) at T = 1, (√3, 1)/(1 + √3) at T = 2
    student, teacher = T([[0.0, 0.0]], dtype=torch.float64), T([[math.log(3.0), 0.0]], dtype=torch.float64)
    p = 0.75 if temperature == 1 else math.sqrt(3) / (1 + math.sqrt(3))
    kl_want = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    loss, kl, ce = distill_loss(student, teacher, T([0]), temperature, alpha=0.3)
    torch.testing.assert_close(kl, T([kl_want], dtype=torch.float64))
    torch.testing.assert_close(ce, T([math.log(2)], dtype=torch.float64))
    torch.testing.assert_close(loss, T([0.3 * temperature ** 2 * kl_want + 0.7 * math.log(2)], dtype=torch.float64))


# -- gradients through the segment loop against finite differences --------------------------------------


def random_record(rng: random.Random, vocab: int, length: int) -> dict:
    ids = [rng.randrange(1, vocab) for _ in range(length)]
    cut = rng.randrange(2, length - 3)
    return {"text": ids, "mask": [0] * cut + [1] * (length - cut)}


def write_pairs(path: Path, n: int, vocab: int, seed: int = 0, lengths: tuple[int, int] = (9, 15)) -> Path:
    """Random preference pairs sharing a prompt, of unequal lengths (rows are padded)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        c = random_record(rng, vocab, rng.randint(*lengths))
        r = random_record(rng, vocab, rng.randint(*lengths))
        k = min(c["mask"].index(1), r["mask"].index(1))
        r["text"][:k] = c["text"][:k]
        lines.append(json.dumps({"chosen": c, "rejected": r}))
    path.write_text("\n".join(lines) + "\n")
    return path


def random_state(model, seed: int) -> RWKVState:
    g = torch.Generator().manual_seed(seed)
    return model.zero_state(1).map(lambda t: (torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.3).to(t))


class _ObjectiveLoss(torch.autograd.Function):
    """An objective's loss over a dataset as a function of the initial state: forward is its evaluation
    (segments without gradients), backward its training backward (two micro-batches)."""

    @staticmethod
    def forward(ctx, obj, data, att, wkv, ffn):
        ctx.obj, ctx.data = obj, data
        ctx.save_for_backward(att, wkv, ffn)
        return T(obj.evaluate(data, RWKVState(att, wkv, ffn), batch_size=2).loss, dtype=torch.float64)

    @staticmethod
    def backward(ctx, g):
        leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        records = [ctx.data[i] for i in range(len(ctx.data))]
        groups = [records[:2], records[2:]]
        with torch.enable_grad():
            ctx.obj.backward(groups, lambda: RWKVState(*leaves), ctx.obj.normalisers(groups))
        return None, None, *(t.grad * g for t in leaves)


def gradcheck_objective(obj, data, model) -> None:
    leaves = [t.detach().requires_grad_() for t in random_state(model, 4).tensors()]
    assert torch.autograd.gradcheck(lambda a, w, f: _ObjectiveLoss.apply(obj, data, a, w, f), leaves, eps=1e-6,
                                    atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_preference_gradient_matches_finite_differences_with_segments(tiny_ckpt, tmp_path, name):
    model = statetune.load_model(tiny_ckpt("rwkv7"), dtype=torch.float64)
    data = PreferenceDataset(write_pairs(tmp_path / "p.jsonl", 3, model.config.vocab_size), model.config.vocab_size)
    assert max(data.lengths) > 2 * 4  # every record spans several segments of ctx_len 4
    obj = PreferenceObjective(model, ObjectiveConfig(objective=name, beta=0.5, orpo_lambda=0.7),
                              random_state(model, 9), Segmenting(ctx_len=4))
    gradcheck_objective(obj, data, model)


def test_distill_gradient_matches_finite_differences_with_segments(tiny_ckpt, tmp_path):
    model = statetune.load_model(tiny_ckpt("rwkv7"), dtype=torch.float64)
    teacher = statetune.load_model(write_checkpoint(tmp_path / "t.pth", "rwkv7", n_layer=1, n_embd=24, head_size=8,
                                                    vocab_size=300, dim_ffn=32, seed=7), dtype=torch.float64)
    rng = random.Random(1)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(random_record(rng, 300, rng.randint(9, 14))) + "\n"
                                              for _ in range(3)))
    from statetune.data.loader import TokenDataset

    data = TokenDataset(tmp_path / "d.jsonl", 300)
    config = ObjectiveConfig(objective="distill", teacher="t.pth", distill_temperature=2.0, distill_alpha=0.3)
    obj = DistillObjective(model, teacher, random_state(teacher, 3), config, Segmenting(ctx_len=4), chunk=5)
    gradcheck_objective(obj, data, model)


# -- training runs ------------------------------------------------------------------------------------------


def write_preference_task(root: Path, n_train: int = 32, n_val: int = 8) -> tuple[Path, Path]:
    """The tiny task of train_data.py as pairs: after ``Q: <word>\\nA:``, `` ok!`` is preferred to `` no?``."""
    rng = random.Random(0)
    out = []
    for name, n in (("ptrain", n_train), ("pval", n_val)):
        words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))) for _ in range(n)]
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"chosen": record(w), "rejected": record(w, " no?\n")}) + "\n"
                                for w in words))
        path.with_name(f"{name}.meta.json").write_text(json.dumps({"kind": "preference", "tokenizer": "bytes"}))
        out.append(path)
    return out[0], out[1]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    model = write_checkpoint(root / "m.pth", "rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=300,
                             dim_ffn=64, seed=3)
    train_path, val_path = write_task(root)
    ptrain, pval = write_preference_task(root)
    # the teacher: the same model from a state trained on the task, which the student can learn to imitate
    assert train(TrainOptions(model=str(model), train_data=str(train_path), out=str(root / "teacher"), lr=10.0,
                              max_steps=8, progress=False, samples=0)) == 0
    teacher_state = root / "teacher" / "state-final.safetensors"
    return {"model": model, "sft": (train_path, val_path), "pref": (ptrain, pval), "teacher_state": teacher_state}


def objective_args(task, name: str) -> dict:
    if name == "distill":
        return {"objective": "distill", "teacher": str(task["model"]), "teacher_state": str(task["teacher_state"]),
                "distill_alpha": 1.0}
    return {"objective": name}


def run(task, out: Path, name: str, **kw) -> Path:
    tr, va = task["pref" if name in ("dpo", "orpo") else "sft"]
    opts = TrainOptions(model=str(task["model"]), train_data=str(tr), val_data=str(va), out=str(out), progress=False,
                        **{"batch_size": 8, "ctx_len": 7, "lr": 10.0, **objective_args(task, name), **kw})
    assert train(opts) == 0
    return out


def val_events(out: Path) -> list[dict]:
    return [e for e in read_metrics(out / "metrics.jsonl") if e["type"] == "val"]


@pytest.mark.parametrize("name", ["dpo", "orpo", "distill"])
def test_a_short_run_lowers_its_objective(task, tmp_path, name):
    out = run(task, tmp_path / name, name, max_steps=8, eval_every=4, samples=1)
    vals = val_events(out)
    assert vals[-1]["loss"] < vals[0]["loss"] - 0.05, vals
    assert vals[0]["baseline_loss"] == vals[0]["loss"]
    if name == "dpo":
        assert vals[0]["loss"] == pytest.approx(math.log(2))  # the policy starts as the reference
        assert vals[-1]["accuracy"] == 1.0 and vals[-1]["margin"] > 0 and "chosen_loss" in vals[-1]
    elif name == "orpo":
        assert vals[-1]["chosen_loss"] < vals[0]["chosen_loss"] and vals[-1]["accuracy"] == 1.0
    else:
        assert vals[-1]["kl"] < vals[0]["kl"] and "ce" in vals[-1]
    trained = statetune.load_state(out / "state-best.safetensors").metadata["trained"]
    want = {"dpo": {"beta": 0.1}, "orpo": {"orpo_lambda": 0.1},
            "distill": {"teacher": str(task["model"]), "teacher_state": str(task["teacher_state"]),
                        "distill_temperature": 1.0, "distill_alpha": 1.0}}[name]
    assert trained["objective"] == {"objective": name, **want}
    assert tomllib.loads((out / "config.toml").read_text())["objective"] == name
    assert trained["val_loss"] == min(e["loss"] for e in vals[1:])  # best state chosen by the objective's loss


def test_dpo_with_lr_auto_ema_layers_and_state_l2(task, tmp_path):
    out = run(task, tmp_path / "all", "dpo", max_steps=4, eval_every=2, samples=0, lr="auto", lr_search_steps=2,
              lr_search_rates=[1.0, 10.0], ema=0.5, layers="1", state_l2=0.01, tune_shift=True)
    search = json.loads((out / "lr_search.json").read_text())
    assert len(search["trials"]) == 3 and all(t["loss"] < math.log(2) for t in search["trials"])
    state = statetune.load_state(out / "state-final.safetensors").state
    assert state.wkv[0].abs().sum() == 0 and state.att_shift[0].abs().sum() == 0  # layer 0 untouched
    assert state.wkv[1].abs().sum() > 0
    train_events = [e for e in read_metrics(out / "metrics.jsonl") if e["type"] == "train"]
    assert all("state_l2" in e and "accuracy" in e for e in train_events)


def test_sft_is_the_default_and_unchanged(task, tmp_path):
    """--objective sft logs exactly the fields (and, see test_loss_curve, the numbers) it always did."""
    out = run(task, tmp_path / "sft", "sft", max_steps=2, eval_every=2, samples=0)
    train_event = next(e for e in read_metrics(out / "metrics.jsonl") if e["type"] == "train")
    assert set(train_event) == {"type", "step", "loss", "grad_norm", "loss_tokens", "lr", "tokens", "tokens_per_s",
                                "elapsed_s"}
    assert set(val_events(out)[-1]) == {"type", "step", "loss", "ppl", "loss_tokens", "baseline_loss", "best"}
    trained = statetune.load_state(out / "state-final.safetensors").metadata["trained"]
    assert trained["objective"] == {"objective": "sft"}


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "statetune", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=300)


def _flags(task, name: str) -> list[str]:
    tr, va = task["pref" if name in ("dpo", "orpo") else "sft"]
    flags = ["--model", str(task["model"]), "--train-data", str(tr), "--val-data", str(va), "--batch-size", "8",
             "--ctx-len", "7", "--lr", "10", "--no-progress", "--threads", "1", "--samples", "0"]
    for k, v in objective_args(task, name).items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo", "orpo", "distill"])
def test_sigkill_resume_is_bit_identical(task, tmp_path, name):
    common = ["train", *_flags(task, name), "--max-steps", "6", "--eval-every", "3", "--save-every", "2"]
    assert _cli([*common, "--out", str(tmp_path / "full")]).returncode == 0
    assert _cli([*common, "--out", str(tmp_path / "cut")], env={"STATETUNE_KILL_AT_STEP": "5"}).returncode == -9
    resumed = _cli(["train", "--resume", str(tmp_path / "cut"), "--threads", "1"])
    assert resumed.returncode == 0, resumed.stderr
    for file in ("state-final.safetensors", "state-best.safetensors"):
        a = statetune.load_state(tmp_path / "full" / file).state
        b = statetune.load_state(tmp_path / "cut" / file).state
        assert torch.equal(a.wkv, b.wkv), file
    full, cut = val_events(tmp_path / "full"), val_events(tmp_path / "cut")
    assert [e["loss"] for e in full] == [e["loss"] for e in cut]


@pytest.mark.slow
def test_dpo_two_processes_match_one(task, tmp_path):
    common = [*_flags(task, "dpo"), "--max-steps", "2", "--save-every", "100"]
    one = _cli(["train", *common, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    common[common.index("--batch-size") + 1] = "4"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "statetune", "train", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a = statetune.load_state(tmp_path / "one" / "state-final.safetensors").state
    b = statetune.load_state(tmp_path / "two" / "state-final.safetensors").state
    torch.testing.assert_close(a.wkv, b.wkv, atol=1e-5, rtol=1e-4)
    assert a.wkv.abs().sum() > 0


# -- data and options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("line,match", [
    ('{"chosen": {"text": [1, 2, 3], "mask": [0, 1, 1]}}', "expected an object with 'chosen' and 'rejected'"),
    ('{"chosen": {"text": [1, 2], "mask": [0, 1]}, "rejected": {"text": "ab"}}',
     "'rejected': field 'text' is a string"),
    ('{"chosen": {"text": [1, 2], "mask": [0, 0]}, "rejected": {"text": [1, 3], "mask": [0, 1]}}',
     "'chosen' has no loss token"),
    ('{"chosen": {"text": [1, 999], "mask": [0, 1]}, "rejected": {"text": [1, 3], "mask": [0, 1]}}',
     "outside the model's vocabulary"),
    ("[1, 2]", "expected an object"),
    ("{bad", "invalid JSON"),
])
def test_preference_records_are_validated_by_file_and_line(tmp_path, line, match):
    ok = '{"chosen": {"text": [1, 2], "mask": [0, 1]}, "rejected": {"text": [1, 3], "mask": [0, 1]}}'
    path = tmp_path / "p.jsonl"
    path.write_text(f"{ok}\n{line}\n")
    with pytest.raises(DataError, match=match) as e:
        PreferenceDataset(path, 300)
    assert str(e.value).startswith(f"{path}:2: ")


def test_data_kind_from_meta_or_content(tmp_path):
    ok = '{"chosen": {"text": [1, 2], "mask": [0, 1]}, "rejected": {"text": [1, 3], "mask": [0, 1]}}'
    (tmp_path / "p.jsonl").write_text(ok + "\n")
    (tmp_path / "s.jsonl").write_text('{"text": [1, 2], "mask": [0, 1]}\n')
    assert data_kind(tmp_path / "p.jsonl", {}) == "preference"
    assert data_kind(tmp_path / "s.jsonl", {}) == "sft"
    assert data_kind(tmp_path / "s.jsonl", {"kind": "preference"}) == "preference"


@pytest.mark.parametrize("case,code,match", [
    ("dpo_on_sft_data", 1, "--objective dpo trains on preference pairs"),
    ("sft_on_pairs", 1, "but --objective sft trains on records"),
    ("distill_on_pairs", 1, "but --objective distill trains on records"),
    ("beta", 2, "--beta: must be positive"),
    ("lambda", 2, "--orpo-lambda: must not be negative"),
    ("alpha", 2, "--distill-alpha: must be in [0, 1]"),
    ("temperature", 2, "--distill-temperature: must be positive"),
    ("no_teacher", 2, "--objective distill needs --teacher MODEL"),
    ("teacher_without_distill", 2, "only --objective distill uses a teacher"),
    ("teacher_vocab", 2, "distillation needs the same tokenizer and vocabulary"),
    ("bad_objective", 2, "invalid choice: 'ppo'"),
    ("toml_unknown", 2, "unknown option objective.'gamma'"),
])
def test_documented_errors(task, tmp_path, capsys, case, code, match):
    tr, ptr = task["sft"][0], task["pref"][0]
    args = {"--model": str(task["model"]), "--train-data": str(tr), "--out": str(tmp_path / "run"), "--max-steps": "1"}
    if case == "dpo_on_sft_data":
        args["--objective"] = "dpo"
    elif case in ("sft_on_pairs", "distill_on_pairs"):
        args["--train-data"] = str(ptr)
        if case == "distill_on_pairs":
            args.update({"--objective": "distill", "--teacher": str(task["model"])})
    elif case == "beta":
        args.update({"--objective": "dpo", "--beta": "0"})
    elif case == "lambda":
        args["--orpo-lambda"] = "-1"
    elif case == "alpha":
        args["--distill-alpha"] = "2"
    elif case == "temperature":
        args["--distill-temperature"] = "0"
    elif case == "no_teacher":
        args["--objective"] = "distill"
    elif case == "teacher_without_distill":
        args["--teacher"] = str(task["model"])
    elif case == "teacher_vocab":
        other = write_checkpoint(tmp_path / "o.pth", "rwkv7", n_layer=1, n_embd=16, head_size=8, vocab_size=200,
                                 dim_ffn=32, seed=1)
        args.update({"--objective": "distill", "--teacher": str(other)})
    elif case == "bad_objective":
        args["--objective"] = "ppo"
    elif case == "toml_unknown":
        (tmp_path / "c.toml").write_text('[objective]\nobjective = "dpo"\ngamma = 1\n')
        args["--config"] = str(tmp_path / "c.toml")
    argv = ["train"] + [x for kv in args.items() for x in kv] + ["--no-progress"]
    if case == "bad_objective":
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == code
    else:
        assert main(argv) == code
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "run" / "state-final.safetensors").exists()


def test_objective_table_in_toml(task, tmp_path):
    ptr = task["pref"][0]
    (tmp_path / "c.toml").write_text(f'model = "{task["model"]}"\ntrain_data = "{ptr}"\n'
                                     '[objective]\nobjective = "orpo"\norpo-lambda = 0.25\n')
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--no-progress", "--samples", "0"]) == 0
    cfg = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert cfg["objective"] == "orpo" and cfg["orpo_lambda"] == 0.25
    trained = statetune.load_state(tmp_path / "run" / "state-final.safetensors").metadata["trained"]
    assert trained["objective"] == {"objective": "orpo", "orpo_lambda": 0.25}
