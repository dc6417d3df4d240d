"""Class 10 of the fault suite: smaller correctness gaps in data and sampling."""

from __future__ import annotations

import json

import pytest
from abuse import fails, snapshot, unchanged

from statetune.cli import main
from statetune.data.pipeline import in_val, split_key
from statetune.infer.sampling import RowSampler, SamplingParams, sample


def test_an_unterminated_csv_quote_names_its_line(tmp_path, capsys):
    src = tmp_path / "d.csv"
    src.write_text('prompt,completion\nQ1,A1\n"Q2,A2\nQ3,A3\n')
    fails(capsys, ["prepare", src, "--out", tmp_path / "p", "--tokenizer", "bytes"], 1,
          "d.csv:3: a quoted field", "never closed")
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("argv", [
    ["prepare", "IN", "--out", ""],
    ["generate", "--model", "M", "--input", "IN", "--out", ""],
    ["state", "capture", "--model", "M", "--prompt", "x", "--out", ""],
    ["generate", "--model", "", "--prompt", "x"],
], ids=["prepare", "generate", "capture", "model"])
def test_an_empty_file_name_is_a_usage_error(tiny_ckpt, tmp_path, capsys, argv):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "q", "completion": " a"}) + "\n")
    argv = [{"IN": str(src), "M": str(tiny_ckpt())}.get(a, a) for a in argv]
    flag = argv[argv.index("") - 1]
    fails(capsys, argv, 2, f"{flag}: invalid value ''", "cannot be empty")


def test_a_split_that_leaves_no_training_data_is_an_error(tmp_path, capsys):
    group = next(g for g in (f"g{i}" for i in range(100)) if in_val(split_key(g), 0, 0.5))
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": " a", "g": group}) + "\n"
                           for i in range(5)))
    (tmp_path / "p.jsonl").write_text("old\n")
    before = snapshot(tmp_path / "p.jsonl")
    fails(capsys, ["prepare", src, "--out", tmp_path / "p", "--tokenizer", "bytes", "--val-fraction", "0.5",
                   "--split-by", "g"], 1, "the split leaves the training set empty", "all 5 records")
    assert unchanged(before)


def test_a_temperature_float32_rounds_to_zero_is_greedy(tiny_ckpt, capsys):
    import torch

    assert SamplingParams(temperature=1e-46).greedy and not SamplingParams(temperature=1e-30).greedy
    logits = torch.tensor([[0.5, 2.0, 1.0, 1.9]])
    for t in (1e-46, 1e-44, 1e-30):
        assert sample(logits, [RowSampler(SamplingParams(temperature=t, seed=1))]) == [1]
    common = ["generate", "--model", str(tiny_ckpt()), "--prompt", "Hello", "--max-tokens", "16"]
    assert main([*common, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*common, "--temperature", "1e-46"]) == 0
    assert capsys.readouterr().out == greedy
