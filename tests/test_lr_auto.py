"""``train --lr auto`` (the search a run makes before training) and ``--state-l2`` (the pull toward the initial
state), end to end on the tiny Q/A task of the training tests."""

from __future__ import annotations

import json
import math
import tomllib

import pytest
import torch

import statetune
from statetune.cli import main
from statetune.commands.train import TrainOptions, train
from statetune.data.loader import TokenDataset
from statetune.model.checkpoint import load_model
from statetune.options import build, load_toml
from statetune.train.config import TrainConfig
from statetune.train.distributed import Dist
from statetune.train.lr_finder import log_rates
from statetune.train.lr_search import make_trial, search_lr
from statetune.train.metrics import read_metrics
from statetune.tuning.tunable import TunableState


def opts(task, out, **kw) -> TrainOptions:
    model, tr, va = task
    return TrainOptions(model=str(model), train_data=str(tr), val_data=str(va), out=str(out), progress=False,
                        batch_size=8, **kw)


def test_search_picks_the_decade_of_the_best_full_length_rate(task):
    """The best rate is known here by training the run itself (24 steps, the same step and schedule) at two
    rates per decade; the search, with four times fewer steps per trial, lands within half a decade of it."""
    torch.set_num_threads(1)
    model_path, tr, va = task
    model = load_model(model_path)
    model.requires_grad_(False)
    config = TrainConfig(model=str(model_path), train_data=str(tr), val_data=str(va), out="unused", batch_size=8,
                         lr_search_steps=6)
    train_data, val_data = TokenDataset(tr, 300), TokenDataset(va, 300)
    start = model.zero_state(1)
    run = make_trial(model, train_data, val_data, start, config, Dist())
    full = {lr: run(lr, 24) for lr in log_rates(1e-2, 1e2, per_decade=2)}
    best = min(full, key=full.get)
    assert min(full) < best < max(full), full  # an interior optimum: too low learns little, too high overshoots
    assert full[best] < full[min(full)] - 0.5 and full[best] < full[max(full)] - 0.05, full
    search = search_lr(model, train_data, val_data, start, config, Dist())
    assert abs(math.log10(search.lr / best)) <= 0.5 + 1e-6, (search.log(), full)
    assert [t["lr"] for t in search.log()][:4] == [0.1, 1.0, 10.0, 100.0] and len(search.trials) == 6
    assert search.rule.endswith("scored on validation")


def test_lr_auto_trains_at_the_pick_and_records_it(task, tmp_path):
    o = opts(task, tmp_path / "run", lr="auto", lr_search_steps=3, lr_search_rates=[0.1, 10.0], max_steps=4,
             warmup_steps=1, eval_every=2, save_every=2)
    assert train(o) == 0
    run = tmp_path / "run"
    search = json.loads((run / "lr_search.json").read_text())
    assert len(search["trials"]) == 3 and search["lr"] in [t["lr"] for t in search["trials"]]
    text = (run / "config.toml").read_text()
    assert text.startswith("# lr = ") and "--lr auto" in text.splitlines()[0]
    assert tomllib.loads(text)["lr"] == search["lr"]  # the run's config holds the rate it trained at
    trained = statetune.load_state(run / "state-final.safetensors").metadata["trained"]
    assert trained["optim"]["lr"] == search["lr"] and trained["lr_search"] == search
    peak = max(e["lr"] for e in read_metrics(run / "metrics.jsonl") if e["type"] == "train")
    assert peak == pytest.approx(search["lr"])
    # resuming (even with --lr auto given again) keeps the searched rate and searches nothing
    assert main(["train", "--resume", str(run), "--lr", "auto", "--max-steps", "6", "--no-progress"]) == 0
    assert json.loads((run / "lr_search.json").read_text()) == search
    again = statetune.load_state(run / "state-final.safetensors").metadata["trained"]
    assert again["steps"] == 6 and again["lr_search"] == search and again["optim"]["lr"] == search["lr"]


def test_lr_auto_without_validation_scores_held_out_training_batches(task, tmp_path):
    model, tr, _ = task
    o = TrainOptions(model=str(model), train_data=str(tr), out=str(tmp_path / "run"), progress=False, batch_size=4,
                     lr="auto", lr_search_steps=2, lr_search_rates=[1.0], max_steps=1)
    assert train(o) == 0
    search = json.loads((tmp_path / "run" / "lr_search.json").read_text())
    assert search["rule"].endswith("held-out training batches") and search["lr"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--lr", "fast"], "--lr: invalid value 'fast': expected a number or auto"),
    (["--lr", "nan"], "--lr: invalid value 'nan': must be a finite number"),
    (["--lr", "-1"], "--lr: must not be negative, got -1.0"),
    (["--lr", "auto", "--lr-search-rates", "1", "0"], "--lr-search-rates: need positive rates"),
    (["--lr", "auto", "--lr-search-steps", "0"], "--lr-search-steps: must be at least 1"),
    (["--state-l2", "-0.1"], "--state-l2: must not be negative"),
])
def test_bad_search_and_l2_flags_are_usage_errors(task, tmp_path, capsys, argv, message):
    model, tr, va = task
    base = ["train", "--model", str(model), "--train-data", str(tr), "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_lr_auto_on_too_little_data_without_validation_is_a_clear_error(task, tmp_path, capsys):
    model, _, _ = task
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(line for line in task[1].read_text().splitlines(keepends=True)[:8]))
    argv = ["train", "--model", str(model), "--train-data", str(tiny), "--out", str(tmp_path / "r"), "--lr", "auto",
            "--max-steps", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--lr auto: without --val-data" in err and "tiny.jsonl" in err and "Traceback" not in err


def test_state_l2_keeps_the_state_closer_to_where_it_started(task, tmp_path):
    """Same run with and without the penalty: the penalised state ends nearer its initial value, and its
    logged penalty is the documented weight times the squared distance."""
    norms = {}
    for l2 in (0.0, 0.05):
        out = tmp_path / f"l2-{l2}"
        assert train(opts(task, out, lr=1.0, state_l2=l2, max_steps=12, eval_every=12)) == 0
        state = statetune.load_state(out / "state-final.safetensors").state
        norms[l2] = float(state.wkv.square().sum())
        logged = [e.get("state_l2") for e in read_metrics(out / "metrics.jsonl") if e["type"] == "train"]
        assert (logged[-1] is None) == (l2 == 0.0)
    assert norms[0.05] < 0.7 * norms[0.0], norms


def test_distance_sq_counts_what_is_trained():
    base = statetune.model.state.RWKVState(torch.zeros(2, 1, 4), torch.zeros(2, 1, 1, 2, 2), torch.zeros(2, 1, 4))
    from statetune.tuning.config import StateTuningConfig

    t = TunableState(base, StateTuningConfig(tune_shift=True))
    with torch.no_grad():
        t.wkv.fill_(1.0)
        t.att_shift.fill_(2.0)
    assert float(t.distance_sq().detach()) == pytest.approx(2 * 4 * 1.0 + 2 * 4 * 4.0)
    enc = TunableState(base, StateTuningConfig(param="encoder", encoder_in=2, encoder_hidden=3))
    assert float(enc.distance_sq().detach()) == 0.0  # the encoder starts at the initial state exactly


def test_config_file_accepts_auto(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[optim]\nlr = "auto"\nlr_search_rates = [1, 10]\n')
    built = build(TrainConfig, load_toml(cfg, TrainConfig))
    assert built.optim.lr == "auto" and built.optim.lr_search_rates == [1.0, 10.0]
