"""``statetune eval``: side-by-side loss, generation metrics with multiple references, plots, errors."""

from __future__ import annotations

import json

import pytest
from conftest import write_checkpoint
from train_data import record, write_task

from statetune.cli import main
from statetune.commands.train import TrainOptions, train
from statetune.data.loader import TokenDataset
from statetune.evaluate.compare import prompts_and_references
from statetune.evaluate.generation import DEFAULT_PENALTIES
from statetune.evaluate.metrics import generation_scores


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = write_checkpoint(root / "m.pth", "rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=300, dim_ffn=64,
                             seed=3)
    tr, va = write_task(root)
    train(TrainOptions(model=str(model), train_data=str(tr), val_data=str(va), out=str(root / "run"), max_steps=20,
                       eval_every=20, progress=False))
    return model, va, root / "run"


@pytest.mark.slow
def test_side_by_side_loss_and_generation(trained, tmp_path, capsys):
    model, va, run = trained
    out = tmp_path / "report"
    assert main(["eval", "--model", str(model), "--data", str(va), "--state", str(run / "state-best.safetensors"),
                 "--generate", "--max-tokens", "4", "--max-prompts", "3", "--out", str(out)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    base, tuned = report["rows"]
    assert base["name"] == "base (zero state)" and tuned["name"] == "state-best"
    assert tuned["loss"] < base["loss"] - 0.5
    assert {"bleu", "chrf", "rouge_l", "exact_match"} <= set(tuned) and tuned["prompts"] == 3
    assert "| state-best |" in (tmp_path / "report.md").read_text()
    assert len(report["examples"]) == 3


def test_records_sharing_a_prompt_are_one_prompt_with_several_references(tmp_path):
    lines = [record("x", " one\n"), record("x", " two\n"), record("y", " three\n")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    groups = prompts_and_references(TokenDataset(tmp_path / "d.jsonl"), {0})
    assert len(groups) == 2 and len(groups[0][1]) == 2 and groups[0][1][0][-1] != 0


def test_generation_scores():
    perfect = generation_scores(["the cat sat on the mat"], [["a dog", "the cat sat on the mat"]])
    assert perfect["bleu"] == pytest.approx(100) and perfect["exact_match"] == 100 and perfect["rouge_l"] == 100
    wrong = generation_scores(["zzz qqq"], [["the cat sat on the mat"]])
    assert wrong["bleu"] < 1 and wrong["exact_match"] == 0 and wrong["chrf"] < perfect["chrf"]


def test_plot(trained):
    _, _, run = trained
    assert main(["eval", "plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_errors(trained, tmp_path, capsys):
    model, va, _ = trained
    assert main(["eval", "--data", str(va)]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--model", str(model), "--data", str(va), "--state", str(tmp_path / "no.safetensors")]) == 1
    assert "no such state file" in capsys.readouterr().err
    assert main(["eval", "plot", str(tmp_path)]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err


def test_generate_penalties_reach_the_decoder(trained, tmp_path):
    """The penalty flags change what is generated, and the report says which penalties made its numbers."""
    model, va, run = trained
    state = str(run / "state-best.safetensors")
    outs = {}
    plain = ["--presence-penalty", "0", "--frequency-penalty", "0", "--penalty-decay", "1"]
    for name, extra, presence in (("default", [], DEFAULT_PENALTIES["presence_penalty"]), ("plain", plain, 0.0),
                                  ("penalised", ["--presence-penalty", "100"], 100.0)):
        assert main(["eval", "--model", str(model), "--data", str(va), "--state", state, "--generate",
                     "--max-tokens", "12", "--max-prompts", "4", "--examples", "4", "--out",
                     str(tmp_path / name), *extra]) == 0
        report = json.loads((tmp_path / f"{name}.json").read_text())
        outs[name] = [e["outputs"]["state-best"] for e in report["examples"]]
        assert report["decoding"]["presence_penalty"] == presence
    assert outs["plain"] != outs["penalised"], outs


@pytest.mark.parametrize("flag, value, message", [
    ("--penalty-decay", "0", "--penalty-decay: must be in (0, 1]"),
    ("--repetition-penalty", "0", "--repetition-penalty: must be above 0"),
])
def test_bad_penalties_are_usage_errors(trained, capsys, flag, value, message):
    model, va, _ = trained
    assert main(["eval", "--model", str(model), "--data", str(va), "--generate", flag, value]) == 2
    assert message in capsys.readouterr().err
