"""One command for a CUDA machine: is statetune's GPU path right, and how fast and how lean is it?

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Installs nothing: it expects ``pip install -e ".[cuda]"`` (flash-linear-attention) on top of a CUDA build of
torch, and says so in the table when fla is missing. It runs, in order:

1. kernels: fla and the chunked path against the reference loop on the device, in fp32 and bf16, RWKV-7 and
   RWKV-6 (relative error of the output, the final state and the gradient of the initial state);
2. a bf16 state-tuning step (forward + backward into the state only) on random RWKV-7 models of the 0.1B
   and 1.5B shapes, fla vs chunked: tokens/s and peak GPU memory;
3. peak memory of state tuning vs full fine-tuning (AdamW over every weight) for the 1.5B shape;
4. ``statetune prepare``, ``statetune train --device cuda`` for a few steps and ``statetune generate
   --device cuda`` on the shipped tiny model, as subprocesses.

``--device cpu --tiny`` runs the same code on small shapes without CUDA (what the test suite checks); on CPU
the fla rows are skipped and memory is not measured.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchio import print_rows, write_json  # noqa: E402

# (layers, width) of the model families timed; vocabulary 65536, head size 64, FFN 4x
SHAPES = {"0.1B": (12, 768), "1.5B": (24, 2048)}
TINY_SHAPES = {"tiny-a": (2, 64), "tiny-b": (2, 128)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference value."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def fla_status(device: torch.device) -> str:
    """'ok', or why the fla rows are skipped."""
    from statetune.ops.dispatch import fla_available, triton_interpreter_on

    if not fla_available():
        return "skipped: flash-linear-attention not installed (pip install -e '.[cuda]')"
    if device.type != "cuda" and not triton_interpreter_on():
        return "skipped: fla needs CUDA"
    return "ok"


def kernel_inputs(version: str, B: int, T: int, H: int, N: int, dtype: torch.dtype, device: torch.device,
                  seed: int) -> list[torch.Tensor]:
    """Random WKV inputs in a trained model's ranges; the state (last) is fp32 and requires grad."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -torch.rand(B, T, H, N, generator=g) * 0.6 - 0.01
    state = torch.randn(B, H, N, N, generator=g) * 0.1
    if version == "rwkv7":
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
        xs = [r, w, k, v, -kk, kk * torch.rand(B, T, H, N, generator=g)]
    else:
        xs = [r, w, k, v, torch.randn(H, N, generator=g) * 0.3]
    # inputs rounded to the dtype under test; the decay stays fp32 as the models keep it
    xs = [x.to(device, torch.float32 if i == 1 else dtype) for i, x in enumerate(xs)]
    return [*xs, state.to(device).requires_grad_()]


def run_wkv(version: str, impl: str, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, final state and the gradient of the initial state (of a fixed random projection of both)."""
    from statetune.ops import wkv6, wkv7

    state = xs[-1]
    state.grad = None
    if impl == "reference":  # the loop in fp32 on the same rounded inputs
        inputs = [x.float() for x in xs[:-1]]
    else:
        inputs = xs[:-1]
    y, s = (wkv7 if version == "rwkv7" else wkv6)(*inputs, state, impl=impl)
    g = torch.Generator().manual_seed(7)
    proj_y = torch.randn(y.shape, generator=g).to(y.device)
    proj_s = torch.randn(s.shape, generator=g).to(s.device)
    ((y.float() * proj_y).sum() + (s.float() * proj_s).sum()).backward()
    return y.detach(), s.detach(), state.grad.detach().clone()


def check_kernels(device: torch.device, tiny: bool) -> list[dict[str, Any]]:
    """Section 1: every implementation against the reference loop."""
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


def random_model(layers: int, width: int, vocab: int, device: torch.device, dtype: torch.dtype):
    """A random RWKV-7 of the given shape, loaded as ``load_model`` would (frozen, official names)."""
    from statetune.model.checkpoint import build_model
    from statetune.model.config import infer_config
    from statetune.model.random_init import random_checkpoint

    sd = random_checkpoint("rwkv7", n_layer=layers, n_embd=width, head_size=64, vocab_size=vocab, seed=0,
                           lora={"w": 64, "a": 64, "v": 32, "g": 128} if width >= 1024 else None)
    model = build_model(infer_config(sd, "random"))
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def tuning_step(model, tokens: torch.Tensor, wkv: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    """Forward + backward into the state (+ the optimizer step): one step of state tuning."""
    from statetune.model.state import RWKVState

    z = model.zero_state(1)
    logits, _ = model(tokens[:, :-1], RWKVState(z.att_shift, wkv, z.ffn_shift))
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


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


def time_tuning(device: torch.device, shapes: dict[str, tuple[int, int]], tiny: bool, steps: int, batch: int,
                seq: int) -> list[dict[str, Any]]:
    """Section 2: tokens/s and peak memory of a state-tuning step, per shape, dtype and WKV path."""
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
                wkv = torch.zeros_like(model.zero_state(1).wkv, requires_grad=True)
                opt = torch.optim.Adam([wkv], lr=1e-3)
                tuning_step(model, tokens, wkv, opt)  # warm-up (kernel compilation, allocator)
                _sync(device)
                _reset_peak(device)
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    tuning_step(model, tokens, wkv, opt)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                best = min(times)
                rows.append({**row, "status": "ok", "step_s": best, "tokens_per_s": batch * seq / best,
                             "peak_gb": _peak_gb(device)})
            del model
    return rows


def memory_full_vs_state(device: torch.device, shapes: dict[str, tuple[int, int]], tiny: bool, batch: int,
                         seq: int) -> dict[str, Any]:
    """Section 3: peak memory of one state-tuning step vs one full fine-tuning step (AdamW on every weight),
    for the largest shape timed."""
    name, (layers, width) = next(reversed(shapes.items()))
    vocab = 1000 if tiny else 65536
    out: dict[str, Any] = {"shape": name, "dtype": "bf16", "batch": batch, "seq": seq}
    if device.type != "cuda":
        return {**out, "status": "skipped: peak memory is measured on CUDA only"}
    model = random_model(layers, width, vocab, device, torch.bfloat16)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    wkv = torch.zeros_like(model.zero_state(1).wkv, requires_grad=True)
    _reset_peak(device)
    tuning_step(model, tokens, wkv, torch.optim.Adam([wkv], lr=1e-3))
    _sync(device)
    out["state_tuning_gb"] = _peak_gb(device)
    model.requires_grad_(True)
    wkv = torch.zeros_like(wkv, requires_grad=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    _reset_peak(device)
    tuning_step(model, tokens, wkv, opt)
    _sync(device)
    out["full_finetune_gb"] = _peak_gb(device)
    out["ratio"] = out["full_finetune_gb"] / out["state_tuning_gb"]
    out["status"] = "ok"
    del model, opt
    return out


def cli_runs(device: torch.device, work: Path, steps: int) -> list[dict[str, Any]]:
    """Section 4: the commands a user runs, as subprocesses on the shipped tiny model."""
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
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "statetune", *args], capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        rows.append({"command": f"statetune {name}", "rc": proc.returncode,
                     "seconds": time.perf_counter() - t0, "last_line": tail[0][:200]})
        if proc.returncode != 0:
            break
    return rows


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The printed table: one row per measurement."""
    rows = [("device", report["device"]), ("torch", report["torch"]), ("fla", report["fla"])]
    for r in report["kernels"]:
        label = f"kernels {r['version']} {r['dtype']} {r['impl']}"
        rows.append((label, r["status"] if r["status"] != "ok" else
                     f"output {r['output']:.1e}  final state {r['final_state']:.1e}  d state0 {r['d_state0']:.1e}"))
    for r in report["tuning"]:
        label = f"state-tuning step {r['shape']} {r['dtype']} {r['impl']}"
        rows.append((label, r["status"] if r["status"] != "ok" else
                     f"{r['tokens_per_s']:.0f} tokens/s  ({r['step_s'] * 1e3:.1f} ms, B={r['batch']} T={r['seq']})"
                     f"  peak {fmt(r['peak_gb'], '.2f')} GB"))
    m = report["memory"]
    rows.append((f"memory {m['shape']} state vs full fine-tuning", m["status"] if m["status"] != "ok" else
                 f"{m['state_tuning_gb']:.2f} GB vs {m['full_finetune_gb']:.2f} GB ({m['ratio']:.1f}x)"))
    for r in report["cli"]:
        rows.append((r["command"], f"rc {r['rc']}  {r['seconds']:.1f} s  {r['last_line']}"))
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="Device to check (default cuda).")
    ap.add_argument("--tiny", action="store_true", help="Small shapes (for CPU, and for the test suite).")
    ap.add_argument("--shapes", default="", help="Comma-separated shapes to time (default all: "
                    f"{', '.join(SHAPES)}; with --tiny: {', '.join(TINY_SHAPES)}).")
    ap.add_argument("--steps", type=int, default=5, help="Timed steps per configuration (best is reported).")
    ap.add_argument("--batch", type=int, default=4, help="Sequences per state-tuning step.")
    ap.add_argument("--seq", type=int, default=1024, help="Tokens per sequence.")
    ap.add_argument("--train-steps", type=int, default=10, help="Steps of the `statetune train` run.")
    ap.add_argument("--skip-cli", action="store_true", help="Skip section 4 (the subprocess commands).")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch.")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json", help="JSON report path.")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from statetune.device import resolve_device
    from statetune.errors import OptionError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except OptionError as e:
        raise SystemExit(f"gpu_check: {e}") from None
    seq = min(args.seq, 64) if args.tiny else args.seq
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {"device": f"{device} ({name})", "torch": torch.__version__, "fla": fla_status(device),
                              "tiny": args.tiny, "batch": args.batch, "seq": seq}
    report["kernels"] = check_kernels(device, args.tiny)
    shapes = pick_shapes(args.tiny, args.shapes)
    report["tuning"] = time_tuning(device, shapes, args.tiny, args.steps, args.batch, seq)
    report["memory"] = memory_full_vs_state(device, shapes, args.tiny, args.batch, seq)
    if args.skip_cli:
        report["cli"] = []
    else:
        with tempfile.TemporaryDirectory() as work:
            report["cli"] = cli_runs(device, Path(work), args.train_steps)
    print_rows(table(report))
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
