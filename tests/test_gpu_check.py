"""``benchmarks/gpu_check.py`` has not run on a GPU here; what runs on CPU is checked: its argument parsing,
the kernel comparison and the state-tuning timing on tiny shapes, the table and the JSON report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help_and_bad_arguments(gpu_check, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--help"])
    assert e.value.code == 0 and "--device" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--shapes: unknown 7B"):
        gpu_check.pick_shapes(False, "0.1B,7B")
    with pytest.raises(SystemExit, match="--device: 'nope' is not a device"):
        gpu_check.main(["--device", "nope"])


def test_tiny_run_on_cpu_writes_table_and_json(gpu_check, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # fla must be skipped on CPU, not interpreted
    out = tmp_path / "gc.json"
    report = gpu_check.main(["--device", "cpu", "--tiny", "--skip-cli", "--steps", "1", "--batch", "1",
                             "--shapes", "tiny-a", "--out", str(out), "--threads", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    chunked = [r for r in report["kernels"] if r["impl"] == "chunked"]
    assert {(r["version"], r["dtype"]) for r in chunked} == {(v, d) for v in ("rwkv7", "rwkv6")
                                                             for d in ("fp32", "bf16")}
    for r in chunked:
        assert max(r["output"], r["final_state"], r["d_state0"]) < 1e-5, r
    assert all(r["status"].startswith("skipped") for r in report["kernels"] if r["impl"] == "fla")
    timed = [r for r in report["tuning"] if r["status"] == "ok"]
    assert {(r["dtype"], r["impl"]) for r in timed} == {("fp32", "chunked"), ("bf16", "chunked")}
    assert all(r["tokens_per_s"] > 0 and r["peak_gb"] is None for r in timed)
    assert report["memory"]["status"].startswith("skipped")
    text = capsys.readouterr().out
    assert "kernels rwkv7 bf16 chunked" in text and "state-tuning step tiny-a fp32 chunked" in text


@pytest.mark.slow
def test_cli_section_runs_prepare_train_generate(gpu_check, tmp_path):
    import torch

    rows = gpu_check.cli_runs(torch.device("cpu"), tmp_path, steps=2)
    assert [r["command"] for r in rows] == ["statetune prepare", "statetune train", "statetune generate"]
    assert all(r["rc"] == 0 for r in rows), rows
