"""The decoding comparison (benchmarks/quality_decoding.py): its loop detector and a smoke run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality_decoding  # noqa: E402

from statetune.model.random_init import random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_loops_finds_a_repeated_word_trigram() -> None:
    assert quality_decoding.loops("a coffee shop near the coffee shop near the river")
    assert not quality_decoding.loops("a coffee shop near the river, a coffee place")
    assert not quality_decoding.loops("")


@pytest.mark.slow
def test_decoding_quick_end_to_end(tmp_path: Path) -> None:
    model, data = tmp_path / "tiny.pth", tmp_path / "e2e.csv"
    torch.save(random_checkpoint("rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=257, dim_ffn=64,
                                 seed=3), model)
    with data.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mr", "ref"])
        w.writerows([f"name[Place {i}], area[riverside]", f"Place {i} is by the river."] for i in range(30))
    cmd = [sys.executable, str(REPO / "benchmarks/quality_decoding.py"), "--quick", "--model", str(model),
           "--data", str(data), "--results-dir", str(tmp_path / "res"), "--scales", "0,1", "--save-state",
           str(tmp_path / "s.safetensors")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "res/quality_decoding_quick.json").read_text())
    assert list(out["settings"]) == list(quality_decoding.SETTINGS) and out["val_mrs"] == 3
    assert out["trained"]["steps"] == 3 and out["best_setting"] in out["settings"]
    assert [x["scale"] for x in out["scales"]] == [0.0, 1.0] and all(x["val_loss"] > 0 for x in out["scales"])
    assert (tmp_path / "s.safetensors").is_file()  # --save-state keeps the trained state
    md = (tmp_path / "res/quality_decoding_quick.md").read_text()
    n_greedy = sum(name.startswith("greedy") for name in quality_decoding.SETTINGS)
    assert md.count("| greedy") == n_greedy and "quality_decoding: end" in md and "| 0 |" in md
