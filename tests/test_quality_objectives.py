"""The objectives study (benchmarks/quality_objectives.py): its preference pairs break faithfulness, a merged
LoRA teacher is the LoRA model, the results file skips finished runs, and a --quick run end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality import methods, objectives, objectives_results  # noqa: E402

from statetune.evaluate.faithfulness import parse_mr  # noqa: E402
from statetune.model.checkpoint import load_model  # noqa: E402
from statetune.model.random_init import random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIDE = {
    "name[Alimentum], area[city centre]": ["Alimentum is in the city centre.", "In the city centre: Alimentum."],
    "name[The Punter], area[riverside]": ["The Punter is by the river.", "The Punter, on the riverside."],
    "name[Alimentum], area[riverside]": ["Alimentum is by the river."],
}


def tiny_model(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pth"
    torch.save(random_checkpoint("rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=257, dim_ffn=64,
                                 seed=3), path)
    return path


def test_pairs_reject_a_reference_of_another_mr_that_contradicts_this_one() -> None:
    rows = [(mr, ref) for mr, refs in SIDE.items() for ref in refs]
    pairs = objectives.pair_rows(SIDE, rows, seed=1)
    assert [(p["mr"], p["chosen"]) for p in pairs] == rows
    for p in pairs:
        own = SIDE[p["mr"]]
        assert p["rejected"] not in own and objectives.contradicts(p["mr"], p["rejected"])
        assert not objectives.contradicts(p["mr"], p["chosen"]), p
    assert pairs == objectives.pair_rows(SIDE, rows, seed=1)  # fixed by the seed
    assert parse_mr(pairs[0]["mr"]) == {"name": "Alimentum", "area": "city centre"}


def test_pairs_stop_when_no_other_reference_contradicts() -> None:
    side = {"name[A]": ["A."], "name[A], area[riverside]": ["A."]}
    with pytest.raises(SystemExit, match="no reference of another MR contradicts"):
        objectives.pair_rows(side, [("name[A]", "A.")])


def test_merged_lora_checkpoint_computes_what_the_lora_model_does(tmp_path: Path) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    path = tiny_model(tmp_path)
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=methods.LORA_TARGETS),
                                    load_model(path))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero: make the adapter change the output
    merged = objectives.merged_lora(model, path)
    objectives.save_checkpoint(merged, tmp_path / "merged.pth")
    loaded = load_model(tmp_path / "merged.pth")
    ids = torch.tensor([[5, 70, 101, 9, 33]])
    want, _ = model(ids, None)
    base, _ = load_model(path)(ids, None)
    got, _ = loaded(ids, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, want, atol=1e-3)


def test_results_append_once_and_table_means_over_seeds(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    row = {"lr": 30.0, "trainable": 10, "stages": "sft 4", "test_loss": 1.0, "bleu": 2.0, "chrf": 3.0,
           "ser": 0.5, "distinct": 0.25}
    objectives_results.append(path, "runs", row, method="sft", seed=0)
    objectives_results.append(path, "runs", {**row, "ser": 0.9}, method="sft", seed=0)  # already there: kept
    objectives_results.append(path, "runs", {**row, "ser": 0.7}, method="sft", seed=1)
    res = json.loads(path.read_text())
    assert [r["ser"] for r in res["runs"]] == [0.5, 0.7]
    assert objectives_results.find(res, "runs", method="sft", seed=1)["ser"] == 0.7
    line = objectives_results.table(res).splitlines()[-1]
    assert line.startswith("| sft | sft 4 | 30 | 2 | 10 |") and "0.600 ± 0.141" in line


@pytest.mark.slow
def test_objectives_quick_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "e2e.csv"
    with data.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mr", "ref"])
        w.writerows([f"name[Place {i}], area[{a}]", f"Place {i} is {t}."] for i in range(30)
                    for a, t in (("riverside", "by the river"), ("city centre", "in the city centre")))
    out = tmp_path / "res.json"
    cmd = [sys.executable, str(REPO / "benchmarks/quality_objectives.py"), "--quick", "--model",
           str(tiny_model(tmp_path)), "--data", str(data), "--results", str(out), "--work-dir",
           str(tmp_path / "work"), "--methods", "sft,sft+dpo,orpo,distill-lora,layers-1-1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    got = [r["method"] for r in res["runs"]]
    assert got == ["base", "reference", "sft", "sft+dpo", "orpo", "teacher-lora", "distill-lora", "layers-1-1"]
    for r in res["runs"][2:]:
        assert 0 <= r["ser"] <= 1 and 0 < r["distinct"] <= 1 and r["test_loss"] > 0
    # 2 heads of 16 per layer: 512 a layer
    assert [r["trainable"] for r in res["runs"] if r["method"] in ("sft", "layers-1-1")] == [1024, 512]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and len(json.loads(out.read_text())["runs"]) == len(got)  # all skipped
    assert "| sft+dpo | sft 2 (LR 30) + dpo 2 |" in again.stdout
