"""The facts-vs-format probe's tasks (benchmarks/probe/tasks.py) and its smoke run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from probe import tasks  # noqa: E402

from statetune.model.random_init import random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MR = "name[The Eagle], eatType[coffee shop], customer rating[5 out of 5], near[Burger King]"


def test_restaurants_are_seeded_distinct_and_paraphrases_differ_from_training() -> None:
    a, b = tasks.restaurants(30, seed=0), tasks.restaurants(30, seed=0)
    assert a == b and len({r.name for r in a}) == 30 and a != tasks.restaurants(30, seed=1)
    train = {q for q, _, _ in tasks.fact_rows(a, tasks.TRAIN_QUESTIONS)}
    test = tasks.fact_rows(a, tasks.TEST_QUESTIONS)
    assert len(test) == 30 * 3 * 2 and not train & {q for q, _, _ in test}
    # the same facts are asked: every test answer is the restaurant's attribute
    assert all(ans == getattr(next(r for r in a if r.name in q), attr) for q, ans, attr in test)


def test_recall_is_exact_match_after_normalising() -> None:
    rows = [("q1", "Italian", "cuisine"), ("q2", "Eastmere", "district"), ("q3", "Noor", "chef")]
    r = tasks.recall([" italian.", "Eastmere is nice", "Noor\nmore"], rows)
    assert r["recall"] == pytest.approx(2 / 3) and r["recall_district"] == 0.0 and r["recall_chef"] == 1.0


def test_json_target_follows_the_layout_and_scores_count_broken_outputs() -> None:
    target = tasks.to_json(MR)
    obj = json.loads(target)
    assert tuple(obj) == tasks.LAYOUT and obj["customer rating"] == "5 out of 5" and obj["food"] is None
    reordered = json.dumps(dict(reversed(list(obj.items()))))
    wrong_value = target.replace("The Eagle", "The Heron")
    s = tasks.format_scores([target, reordered, "{not json", wrong_value], [MR] * 4)
    assert s["parse_rate"] == 0.75 and s["layout_rate"] == 0.5
    assert s["field_accuracy"] == pytest.approx((8 + 7) / 32)


@pytest.mark.slow
def test_probe_quick_end_to_end(tmp_path: Path) -> None:
    model = tmp_path / "tiny.pth"
    torch.save(random_checkpoint("rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=257, dim_ffn=64,
                                 seed=3), model)
    cmd = [sys.executable, str(REPO / "benchmarks/probe_facts_format.py"), "--quick", "--model", str(model),
           "--results-dir", str(tmp_path / "res"), "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "res/probe_facts_format_quick.json").read_text())
    assert set(out["facts"]["methods"]) == {"base model", "state_direct", "lora", "full"}
    assert set(out["format"]["methods"]) == {"base model", "state_direct", "lora", "full"}
    assert set(out["mix"]) == {"format state", "E2E state", "average (0.5 / 0.5)", "base model"}
    for m in out["facts"]["methods"].values():
        assert 0 <= m["paraphrases"]["recall"] <= 1 and 0 <= m["train_questions"]["recall"] <= 1
    md = (tmp_path / "res/probe_facts_format_quick.md").read_text()
    assert "fact recall, paraphrases" in md and "average (0.5 / 0.5)" in md
