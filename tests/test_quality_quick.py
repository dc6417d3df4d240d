"""The quality benchmark's --quick mode end to end, on a tiny random checkpoint and a tiny E2E-like CSV.

Checks the plumbing (split, every method trains and is scored, JSON/Markdown/plot written), not quality:
random weights learn nothing in three steps.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from statetune.model.random_init import random_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "quality_e2e.py"
METHODS = ("zero_shot", "few_shot", "state_direct", "state_shift", "state_encoder", "state_encoder_global",
           "state_prompt_init", "state_shift_slow", "lora", "full")
FIELDS = ("trainable", "stored_bytes", "train_s", "best_val", "test_loss", "bleu", "chrf",
          "decode_tokens_per_s", "general_loss")

pytest.importorskip("peft")
pytest.importorskip("sacrebleu")
pytest.importorskip("matplotlib")


def write_csv(path: Path, n_mr: int = 30, refs: int = 2) -> None:
    """An E2E-shaped CSV: ``n_mr`` meaning representations with ``refs`` references each."""
    foods, areas = ("French", "Italian", "Chinese"), ("riverside", "city centre")
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["mr", "ref"])
        for i in range(n_mr):
            food, area = foods[i % 3], areas[i % 2]
            mr = f"name[Place {i}], food[{food}], area[{area}]"
            for j in range(refs):
                w.writerow([mr, f"Place {i} serves {food} food in the {area}{'.' if j == 0 else ', they say.'}"])


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path: Path) -> None:
    model = tmp_path / "tiny.pth"
    torch.save(random_checkpoint("rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=257, dim_ffn=64,
                                 seed=3), model)
    data = tmp_path / "e2e.csv"
    write_csv(data)
    general = tmp_path / "general.txt"
    general.write_text("The quick brown fox jumps over the lazy dog.\n\n" * 30)
    results = tmp_path / "results"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--model", str(model), "--data", str(data),
           "--general-text", str(general), "--results-dir", str(results), "--work-dir", str(tmp_path / "work"),
           "--lr", "state_direct=0.5,0.25"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = json.loads((results / "quality_e2e_quick.json").read_text())
    assert out["complete"] is True
    assert set(out["methods"]) == set(METHODS)
    for name in METHODS:
        m = out["methods"][name]
        assert len(m["runs"]) == 1, name
        for key in FIELDS:
            assert isinstance(m["runs"][0][key], (int, float)), (name, key)
            assert key in m["summary"], (name, key)
    # the split keeps MRs apart, and each side is non-empty
    split = out["data"]["split"]
    assert sum(s["mrs"] for s in split.values()) == 30 and all(s["mrs"] >= 1 for s in split.values())
    # every trained method was swept (one LR in quick mode) on seed 0
    assert set(out["sweep"]) == set(METHODS) - {"zero_shot", "few_shot"}
    # --lr replaces one method's grid; the chosen rate is one of the swept ones
    direct = out["sweep"]["state_direct"]
    assert [r["lr"] for r in direct["runs"]] == [0.5, 0.25] and direct["chosen"] in (0.5, 0.25)
    assert out["config"]["lr_grid"]["state_direct"] == [0.5, 0.25]
    # weights move only for LoRA and full fine-tuning; their storage is what differs
    runs = {k: v["runs"][0] for k, v in out["methods"].items()}
    assert runs["state_direct"]["general_loss"] == runs["zero_shot"]["general_loss"]
    assert runs["full"]["stored_bytes"] > runs["lora"]["stored_bytes"]
    assert runs["lora"]["trainable"] >= runs["state_direct"]["trainable"]
    assert (results / "quality_e2e_quick_curves.png").stat().st_size > 0
    md = (results / "quality_e2e_quick.md").read_text()
    assert "| method |" in md and "python benchmarks/quality_e2e.py --quick" in md


@pytest.mark.slow
@pytest.mark.parametrize("value, message", [("state_direct=", "positive rates"), ("nope=1", "unknown method"),
                                            ("lora=1,x", "positive rates"), ("full=-1", "positive rates")])
def test_bad_lr_grid_is_a_usage_error(value: str, message: str) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--lr", value], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and f"--lr {value}" in proc.stderr


# -- learning curves: budgets, and invocations that merge into one results file ------------------------------

def _curves(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    model, data, general = tmp_path / "tiny.pth", tmp_path / "e2e.csv", tmp_path / "general.txt"
    if not model.exists():
        torch.save(random_checkpoint("rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=257, dim_ffn=64,
                                     seed=3), model)
        write_csv(data)
        general.write_text("The quick brown fox jumps over the lazy dog.\n\n" * 30)
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--model", str(model), "--data", str(data),
           "--general-text", str(general), "--results-dir", str(tmp_path / "results"), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_curves_invocations_merge_into_one_results_file(tmp_path: Path) -> None:
    out = tmp_path / "results" / "quality_curves_quick.json"
    first = _curves(tmp_path, "--budgets", "2,3", "--methods", "state_direct", "--seeds", "2",
                    "--lr", "state_direct=0.5,0.25", "--max-extend", "0")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _curves(tmp_path, "--budgets", "3", "--methods", "lora")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    res = json.loads(out.read_text())
    keys = sorted((p["method"], p["budget"], p["lr"], p["seed"]) for p in res["points"])
    # state_direct: both rates at seed 0 per budget, seed 1 at the chosen one; lora: its quick rate once
    assert [k for k in keys if k[0] == "lora"] == [("lora", 3, 0.01, 0)]
    direct = [k for k in keys if k[0] == "state_direct"]
    assert len(direct) == 6 and {k[1] for k in direct} == {2, 3}
    for budget in (2, 3):
        seed0 = {p["lr"]: p for p in res["points"] if p["method"] == "state_direct" and p["budget"] == budget
                 and p["seed"] == 0}
        chosen = min(seed0.values(), key=lambda p: p["best_val"])
        assert set(seed0) == {0.5, 0.25} and chosen["scored"] and not seed0[0.75 - chosen["lr"]]["scored"]
        assert ("state_direct", budget, chosen["lr"], 1) in keys
        assert chosen["eval_every"] == max(1, budget // 5) and chosen["warmup"] == max(1, budget // 6)
    assert len(res["invocations"]) == 2 and set(res["baselines"]) == {"zero_shot", "few_shot"}

    # running a point again replaces it (no duplicate), and --plan says what would run without running it
    plan = _curves(tmp_path, "--budgets", "3", "--methods", "lora", "--plan")
    assert plan.returncode == 0 and "lora" in plan.stdout and "estimated total" in plan.stdout
    again = _curves(tmp_path, "--budgets", "3", "--methods", "lora")
    assert again.returncode == 0, again.stderr[-3000:]
    res2 = json.loads(out.read_text())
    assert sorted((p["method"], p["budget"], p["lr"], p["seed"]) for p in res2["points"]) == keys
    lora_pt = [p for p in res2["points"] if p["method"] == "lora"][0]
    assert lora_pt["invocation"] == res2["invocations"][-1]["id"] and len(res2["invocations"]) == 3

    md = (tmp_path / "results" / "quality_curves_quick.md").read_text()
    # two budgets in the main table, and the largest again among the state methods
    assert md.count("| LoRA (peft)") == 1 and md.count("| state tuning, direct, WKV only |") == 3
    for png in ("by_budget", "by_params"):
        assert (tmp_path / "results" / f"quality_curves_quick_{png}.png").stat().st_size > 0

    # --lr-auto: the finder's search is logged, its pick trained and scored, and compared with the sweep's rate
    auto = _curves(tmp_path, "--budgets", "3", "--methods", "state_direct", "--lr-auto", "--seeds", "1")
    assert auto.returncode == 0, auto.stdout[-3000:] + auto.stderr[-3000:]
    res3 = json.loads(out.read_text())
    (finder,) = res3["finder"]
    assert finder["budget"] == 3 and len(finder["trials"]) in (5, 6)  # 4 decades + 1 or 2 midpoints
    assert finder["pick"] in [t["lr"] for t in finder["trials"]]
    assert any(p["lr"] == finder["pick"] and p["seed"] == 0 and p["scored"] for p in res3["points"]
               if p["method"] == "state_direct" and p["budget"] == 3)
    assert "### LR finder against the best fixed rate" in (tmp_path / "results/quality_curves_quick.md").read_text()

    assert finder["via"] == "statetune train --lr auto" and finder["rule"].endswith("scored on validation")

    # a parameterised method (train --state-l2) and --scale-sweep: each scored state point gets the
    # validation loss of its state times each factor, and the largest budget's table lists both
    l2 = _curves(tmp_path, "--budgets", "3", "--methods", "state_l2_0.001,state_ema_0.5", "--scale-sweep", "0,0.5")
    assert l2.returncode == 0, l2.stdout[-3000:] + l2.stderr[-3000:]
    res4 = json.loads(out.read_text())
    (pt,) = [p for p in res4["points"] if p["method"] == "state_l2_0.001"]
    assert [a for a, _ in pt["scale"]["val"]] == [0.0, 0.5, 1.0] and pt["scale"]["best"] in (0.0, 0.5, 1.0)
    assert pt["scale"]["val"][-1][1] == pytest.approx(pt["best_val"], rel=1e-4)  # x1 is the state itself
    md = (tmp_path / "results/quality_curves_quick.md").read_text()
    assert "| state tuning, direct, --state-l2 0.001 |" in md and "times the best --state-scale" in md
    assert md.index("| state tuning, direct, --state-l2 0.001 |") < md.index("| state tuning, direct, --ema 0.5 |")
    assert "### Validation loss of a trained state times a factor" in md

    # a file made with another setup is refused, not mixed in
    other = _curves(tmp_path, "--budgets", "3", "--methods", "lora", "--val-records", "3")
    assert other.returncode != 0 and "made with another setup (differs in val_records)" in other.stderr


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_training_its_rates_again(tmp_path: Path) -> None:
    out = tmp_path / "results" / "quality_curves_quick.json"
    args = ("--budgets", "3", "--methods", "state_direct", "--seeds", "1", "--lr", "state_direct=0.5,0.25",
            "--max-extend", "0")
    first = _curves(tmp_path, *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    res = json.loads(out.read_text())
    seed0 = {p["lr"]: p for p in res["points"] if p["method"] == "state_direct"}
    chosen = min(seed0.values(), key=lambda p: p["best_val"])
    # what a sweep killed while scoring its best leaves on disk: every rate's run, none of them scored
    chosen["scored"] = False
    for k in ("test_loss", "bleu", "chrf"):
        chosen.pop(k)
    out.write_text(json.dumps(res))

    again = _curves(tmp_path, *args, "--resume")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("(from the results file)") == 2  # neither rate trained again for the sweep ...
    assert f"retraining lr {chosen['lr']:g} to score it" in again.stdout  # ... only the best, to score it
    after = {p["lr"]: p for p in json.loads(out.read_text())["points"] if p["method"] == "state_direct"}
    assert after[chosen["lr"]]["scored"] and "test_loss" in after[chosen["lr"]]
    assert after[chosen["lr"]]["best_val"] == pytest.approx(chosen["best_val"], rel=1e-5)  # same seed, same run
    other = 0.75 - chosen["lr"]
    assert after[other]["invocation"] == seed0[other]["invocation"]  # the other rate's run is the first one's

    # a complete sweep is not run again at all
    third = _curves(tmp_path, *args, "--resume")
    assert third.returncode == 0 and "best val" not in third.stdout
