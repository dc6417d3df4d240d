"""``benchmarks/gpu_check.py`` has not run on a GPU here; what runs on CPU is checked: its argument parsing,
the kernel comparison, the state-tuning timing and the full-BPTT run on tiny shapes, the peers' skips, the
part runner (time limits, the report rewritten after every part), the table and the JSON report."""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
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
                             "--shapes", "tiny-a", "--out", str(out), "--threads", "1",
                             "--parts", "kernels,tuning,memory,bptt_7b"])
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
    big = report["bptt_7b"]
    assert [r["ctx_len"] for r in big["rows"]] == [64, 256] and big["tokens"] == 256
    assert all(r["status"] == "ok" and r["step_s"] > 0 for r in big["rows"]), big
    # the same sequence, whatever the segment length: full BPTT gives the same loss
    assert abs(big["rows"][0]["loss"] - big["rows"][1]["loss"]) < 1e-2 * abs(big["rows"][1]["loss"])
    assert list(report["parts"]) == ["kernels", "tuning", "bptt_7b", "memory"]  # the order of value
    assert all(p["status"] == "ok" for p in report["parts"].values())
    text = capsys.readouterr().out
    assert "kernels rwkv7 bf16 chunked" in text and "state-tuning step tiny-a fp32 chunked" in text
    assert "tiny full BPTT 256 tokens ctx-len 64" in text


def test_unknown_part_is_a_usage_error(gpu_check):
    with pytest.raises(SystemExit, match="--parts: unknown nope"):
        gpu_check.main(["--device", "cpu", "--tiny", "--parts", "kernels,nope"])


def test_a_peer_whose_files_are_absent_is_skipped(gpu_check, tmp_path, monkeypatch):
    from gpu import peers

    monkeypatch.setattr(peers, "VENDOR", tmp_path)  # an empty vendor folder
    opts = argparse.Namespace(device="cpu", threads=1, tiny=True, shapes="", batch=1, seq=32, steps=1)
    for part, files in ((peers.part_rwkv_peft, "RWKV-PEFT/cuda/rwkv7_state_clampw.cu"),
                        (peers.part_flashrwkv2, "FlashRWKV2/csrc/sm90/tmix/wkv7/statetune_recurrent")):
        status = part(opts)["status"]
        assert status.startswith("skipped: ") and files in status and "absent" in status, status
    # present files on a CPU: skipped for the device, not attempted
    for f in peers.PEFT_FILES:
        (tmp_path / "RWKV-PEFT" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "RWKV-PEFT" / f).write_text("")
    assert "needs --device cuda" in peers.part_rwkv_peft(opts)["status"]


def test_peer_adapters_layouts(gpu_check):
    import torch
    from gpu import peers

    w = -torch.rand(3, 5) * 0.6 - 0.001
    torch.testing.assert_close(peers.logit_to_log_decay(peers.decay_logit(w)), w, rtol=1e-4, atol=1e-6)
    offsets, starts, ends = peers._chunks(2, 40, torch.device("cpu"))
    assert offsets.tolist() == [0, 3, 6]
    assert starts.tolist() == [0, 16, 32, 40, 56, 72] and ends.tolist() == [16, 32, 40, 56, 72, 80]


# -- the part runner: module-level parts, so that a spawned process can import them --

def part_first(opts):
    return {"n": 1}


def part_reads_report(opts):
    """What the report on disk holds when this part starts."""
    return sorted(json.loads(Path(opts.out).read_text())["parts"])


def part_sleeps(opts):
    time.sleep(60)


def part_fails(opts):
    raise ValueError("no such kernel")


@pytest.mark.parametrize("isolate", ["inline", "process"])
def test_runner_limits_parts_and_writes_json_after_each(gpu_check, tmp_path, isolate):
    from gpu.runner import Part, run_parts

    out = tmp_path / "report.json"
    opts = argparse.Namespace(out=str(out))
    parts = [Part("first", part_first, 60), Part("sleeps", part_sleeps, 1.5), Part("fails", part_fails, 60),
             Part("second", part_reads_report, 60)]
    t0 = time.perf_counter()
    report = run_parts(parts, opts, {"device": "test"}, out, isolate, budget_s=120)
    assert time.perf_counter() - t0 < 50  # the sleeping part was stopped, not waited for
    status = {k: v["status"] for k, v in report["parts"].items()}
    assert status == {"first": "ok", "sleeps": "timed out after 1.5 s",
                      "fails": "error: ValueError: no such kernel", "second": "ok"}
    assert report["first"] == {"n": 1}
    assert report["second"] == ["fails", "first", "sleeps"]  # each earlier part was on disk before it ran
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))


def test_runner_skips_parts_once_the_budget_is_spent(gpu_check, tmp_path):
    from gpu.runner import Part, run_parts

    out = tmp_path / "report.json"
    parts = [Part("sleeps", part_sleeps, 60), Part("first", part_first, 60)]
    report = run_parts(parts, argparse.Namespace(out=str(out)), {}, out, "inline", budget_s=1.5)
    assert report["parts"]["sleeps"]["status"] == "timed out after 1.5 s"
    assert report["parts"]["first"]["status"].startswith("skipped: the 2 s budget was spent")


@pytest.mark.slow
def test_cli_section_runs_prepare_train_generate(gpu_check, tmp_path):
    import torch

    rows = gpu_check.cli_runs(torch.device("cpu"), tmp_path, steps=2)
    assert [r["command"] for r in rows] == ["statetune prepare", "statetune train", "statetune generate"]
    assert all(r["rc"] == 0 for r in rows), rows
