"""The statetune parts of the GPU check: kernels against the reference, the state-tuning step, memory against
full fine-tuning, and the user's commands as subprocesses."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gpu.common import (
    DTYPES,
    SHAPES,
    TINY_SHAPES,
    device_of,
    fla_status,
    kernel_inputs,
    peak_gb,
    random_model,
    rel,
    reset_peak,
    run_wkv,
    sync,
    time_steps,
    tuning_step,
)


def pick_shapes(tiny: bool, names: str) -> dict[str, tuple[int, int]]:
    """The model shapes to time: all of the family, or those named in ``--shapes`` (comma-separated)."""
    family = TINY_SHAPES if tiny else SHAPES
    if not names:
        return family
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in family]
    if unknown:
        raise SystemExit(f"gpu_check: --shapes: unknown {', '.join(unknown)}; choose from {', '.join(family)}")
    return {n: family[n] for n in wanted}


def check_kernels(device: torch.device, tiny: bool) -> list[dict[str, Any]]:
    """Every implementation against the reference loop: relative error of output, final state, d state0."""
    B, T, H, N = (2, 37, 2, 16) if tiny else (2, 300, 4, 64)
    fla = fla_status(device)
    rows = []
    for version in ("rwkv7", "rwkv6"):
        for dname, dtype in DTYPES.items():
            xs = kernel_inputs(version, B, T, H, N, dtype, device, seed=1)
            ref = run_wkv(version, "reference", xs)
            for impl in ("chunked", "fla"):
                row: dict[str, Any] = {"version": version, "dtype": dname, "impl": impl, "shape": [B, T, H, N]}
                if impl == "fla" and fla != "ok":
                    row["status"] = fla
                else:
                    got = run_wkv(version, impl, xs)
                    row.update(status="ok", output=rel(got[0], ref[0]), final_state=rel(got[1], ref[1]),
                               d_state0=rel(got[2], ref[2]))
                rows.append(row)
    return rows


def time_tuning(device: torch.device, shapes: dict[str, tuple[int, int]], tiny: bool, steps: int, batch: int,
                seq: int) -> list[dict[str, Any]]:
    """Tokens/s and peak memory of a state-tuning step, per shape, dtype and WKV path."""
    vocab = 1000 if tiny else 65536
    dtypes = DTYPES if device.type == "cpu" else {"bf16": torch.bfloat16}  # on CPU: what bf16 costs vs fp32
    fla = fla_status(device)
    rows = []
    for name, (layers, width) in shapes.items():
        for dname, dtype in dtypes.items():
            model = random_model(layers, width, vocab, device, dtype)
            tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
            for impl in ("chunked", "fla"):
                row: dict[str, Any] = {"shape": name, "layers": layers, "width": width, "dtype": dname,
                                       "impl": impl, "batch": batch, "seq": seq}
                if impl == "fla" and fla != "ok":
                    rows.append({**row, "status": fla})
                    continue
                model.set_wkv_impl(impl)
                rows.append({**row, **time_steps(model, tokens, device, steps)})
            del model
    return rows


def memory_full_vs_state(device: torch.device, shapes: dict[str, tuple[int, int]], tiny: bool, batch: int,
                         seq: int) -> dict[str, Any]:
    """Peak memory of one state-tuning step vs one full fine-tuning step (AdamW on every weight), for the
    largest shape timed."""
    name, (layers, width) = next(reversed(shapes.items()))
    vocab = 1000 if tiny else 65536
    out: dict[str, Any] = {"shape": name, "dtype": "bf16", "batch": batch, "seq": seq}
    if device.type != "cuda":
        return {**out, "status": "skipped: peak memory is measured on CUDA only"}
    model = random_model(layers, width, vocab, device, torch.bfloat16)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    wkv = torch.zeros_like(model.zero_state(1).wkv, requires_grad=True)
    reset_peak(device)
    tuning_step(model, tokens, wkv, torch.optim.Adam([wkv], lr=1e-3))
    sync(device)
    out["state_tuning_gb"] = peak_gb(device)
    model.requires_grad_(True)
    wkv = torch.zeros_like(wkv, requires_grad=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    reset_peak(device)
    tuning_step(model, tokens, wkv, opt)
    sync(device)
    out["full_finetune_gb"] = peak_gb(device)
    out["ratio"] = out["full_finetune_gb"] / out["state_tuning_gb"]
    out["status"] = "ok"
    return out


def cli_runs(device: torch.device, work: Path, steps: int) -> list[dict[str, Any]]:
    """The commands a user runs, as subprocesses on the shipped tiny model."""
    from statetune.commands.demo import COMPLETION, PROMPT, asset

    model = str(asset("tiny-rwkv7", "model.pth"))
    data = work / "e2e"
    run = work / "run"
    cmds = {
        "prepare": ["prepare", str(asset("e2e", "e2e_subset.csv")), "--out", str(data), "--model", model,
                    "--prompt-template", PROMPT, "--completion-template", COMPLETION, "--val-fraction", "0.15"],
        "train": ["train", "--model", model, "--train-data", f"{data}.jsonl", "--val-data", f"{data}.val.jsonl",
                  "--out", str(run), "--device", str(device), "--max-steps", str(steps), "--batch-size", "8",
                  "--eval-every", str(steps), "--val-batches", "2", "--samples", "0", "--no-progress"],
        "generate": ["generate", "--model", model, "--state", str(run / "state-final.safetensors"),
                     "--device", str(device), "--prompt", "name[The Eagle], food[French]", "--max-tokens", "32",
                     "--temperature", "0"],
    }
    rows = []
    for name, args in cmds.items():
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "statetune", *args], capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        rows.append({"command": f"statetune {name}", "rc": proc.returncode,
                     "seconds": time.perf_counter() - start, "last_line": tail[0][:200]})
        if proc.returncode != 0:
            break
    return rows


# -- the parts (functions of the command line's options, run by gpu.runner) --

def part_kernels(opts: Any) -> list[dict[str, Any]]:
    return check_kernels(device_of(opts), opts.tiny)


def part_tuning(opts: Any) -> list[dict[str, Any]]:
    return time_tuning(device_of(opts), pick_shapes(opts.tiny, opts.shapes), opts.tiny, opts.steps, opts.batch,
                       opts.seq)


def part_memory(opts: Any) -> dict[str, Any]:
    return memory_full_vs_state(device_of(opts), pick_shapes(opts.tiny, opts.shapes), opts.tiny, opts.batch,
                                opts.seq)


def part_cli(opts: Any) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as work:
        return cli_runs(device_of(opts), Path(work), opts.train_steps)
