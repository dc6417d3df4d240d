"""The learning-curve results file (benchmarks/quality/points.py): merge by (method, budget, LR, seed, source), the
chosen LR per budget, refusing another setup's file; no training, so it runs in the fast tier."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality import curves, curves_report, methods, points  # noqa: E402

SETUP = {"model": "m.pth", "batch_size": 8}


def point(method: str, budget: int, lr: float, seed: int, best_val: float, **kw) -> dict:
    return {"method": method, "budget": budget, "lr": lr, "seed": seed, "best_val": best_val, "scored": True,
            **kw}


def results(pts: list[dict], inv: str) -> dict:
    return {**points.empty(SETUP), "points": pts, "invocations": [{"id": inv, "date": inv}]}


def test_save_merges_invocations_and_a_point_run_again_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "curves.json"
    points.save(path, results([point("state_direct", 40, 10.0, 0, 1.2), point("state_direct", 40, 3.0, 0, 1.1)],
                              "a"))
    points.save(path, results([point("lora", 40, 0.01, 0, 0.7)], "b"))
    merged = points.save(path, results([point("state_direct", 40, 10.0, 0, 1.0, test_loss=0.9)], "c"))
    assert json.loads(path.read_text()) == merged
    assert [(p["method"], p["lr"]) for p in merged["points"]] == [("lora", 0.01), ("state_direct", 3.0),
                                                                  ("state_direct", 10.0)]
    assert [p["best_val"] for p in merged["points"] if p["lr"] == 10.0] == [1.0]
    assert [i["id"] for i in merged["invocations"]] == ["a", "b", "c"]
    assert points.chosen_lr(merged, "state_direct", 40) == 10.0
    assert not list(tmp_path.glob("*.tmp"))


def test_another_setup_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "curves.json"
    points.save(path, results([point("lora", 40, 0.01, 0, 0.7)], "a"))
    other = {**results([], "b"), "setup": {**SETUP, "batch_size": 4}}
    with pytest.raises(SystemExit, match="differs in batch_size"):
        points.save(path, other)


def test_summary_rows_use_the_chosen_rate_and_ignore_finder_only_rates() -> None:
    pts = [point("state_direct", 160, 3.0, 0, 0.9, test_loss=0.91), point("state_direct", 160, 3.0, 1, 0.95,
                                                                           test_loss=0.97),
           point("state_direct", 160, 10.0, 0, 1.0, test_loss=1.0),
           point("state_direct", 160, 30.0, 0, 0.5, test_loss=0.5, source="finder")]
    (row,) = points.curve_rows(results(pts, "a"))
    assert row["lr"] == 3.0 and row["seeds"] == 2 and row["swept"] == [3.0, 10.0]
    assert row["summary"]["test_loss"]["mean"] == pytest.approx(0.94)


def test_the_finders_run_at_a_swept_rate_sits_beside_the_sweeps_point(tmp_path: Path) -> None:
    path = tmp_path / "curves.json"
    sweep = [point("state_direct", 160, 10.0, 0, 0.86, scored=False), point("state_direct", 160, 30.0, 0, 0.84,
                                                                              test_loss=0.85)]
    points.save(path, results(sweep, "a"))
    finder = {"method": "state_direct", "budget": 160, "pick": 10.0, "search_s": 5.0}
    merged = points.save(path, {**results([point("state_direct", 160, 10.0, 0, 0.87, test_loss=0.88,
                                                 source="finder")], "b"), "finder": [finder]})
    at10 = [p for p in merged["points"] if p["lr"] == 10.0]
    assert sorted(p.get("source", "sweep") for p in at10) == ["finder", "sweep"]  # neither replaced the other
    (row,) = points.curve_rows(merged)
    assert row["lr"] == 30.0 and row["swept"] == [10.0, 30.0] and row["seeds"] == 1
    table = curves_report.finder_table(merged)
    assert "| 10 | 5 | 0.880 | 30 | 0.850 |" in table  # the finder's own run at its pick, the sweep's at its best


def test_schedule_and_ladder_scale_with_the_budget() -> None:
    b = curves.budget_for(40, 8)
    assert (b.warmup, b.eval_every) == (6, 8)  # the single-budget benchmark's schedule
    assert (curves.budget_for(640, 8).warmup, curves.budget_for(640, 8).eval_every) == (106, 128)
    assert curves.centred(10.0) == [10.0, 3.0, 30.0] and curves.centred(0.003) == [0.003, 0.001, 0.01]
    assert curves.centred(1e-3) == [0.001, 0.0003, 0.003]


def test_parameterised_method_names_carry_their_value_and_sort_after_the_direct_state() -> None:
    assert methods.get("state_ema_0.99")[1] == "state tuning, direct, --ema 0.99"
    assert methods.get("state_l2_1e-09")[1] == "state tuning, direct, --state-l2 1e-09"
    for bad in ("state_ema_1", "state_ema_0", "state_ema_x", "state_l2_0", "state_l2_inf", "state_other_1"):
        assert not methods.known(bad), bad
    names = ["lora", "state_ema_0.999", "state_l2_1e-08", "state_ema_0.9", "state_l2_1e-10", "state_direct",
             "state_encoder"]
    assert sorted(names, key=methods.order) == ["state_direct", "state_l2_1e-10", "state_l2_1e-08", "state_ema_0.9",
                                                "state_ema_0.999", "state_encoder", "lora"]
