"""Long sequences: one state-tuning step on one sequence of 2k / 8k / 32k tokens, full vs truncated BPTT.

Uses a random checkpoint with the shapes of the released RWKV-7 0.1B (as ``bench_model.py``) and
``--ctx-len`` 1024. Each case runs in a fresh process, so its peak RSS (``ru_maxrss``) is its own: the
model, one segment's activations and the border states. Half of the tokens carry loss, in blocks of 64
spread over the whole sequence, so every segment has loss. Prints a table and writes JSON.

    python benchmarks/bench_long.py --threads 1 --out benchmarks/results/long_threads1.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchio import print_rows, write_json

SHAPE = dict(n_layer=12, n_embd=768, head_size=64, vocab_size=65536, dim_ffn=3072,
             lora={"w": 64, "a": 64, "v": 32, "g": 128})

CHILD = """
import json, resource, sys, time, torch
from statetune.model.checkpoint import load_model
from statetune.objective import backward_sequence
from statetune.tuning.tunable import TunableState

path, T, ctx_len, bptt, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
model = load_model(path)
tunable = TunableState(model.zero_state(1))
opt = torch.optim.AdamW(tunable.parameters(), lr=1.0)

def step(T):
    g = torch.Generator().manual_seed(T)
    tokens = torch.randint(0, model.config.vocab_size, (1, T + 1), generator=g)
    mask = (torch.arange(T + 1) // 64 % 2 == 1).unsqueeze(0)  # half the tokens, in every segment
    opt.zero_grad(set_to_none=True)
    loss, n = backward_sequence(model, tokens, mask, tunable(), ctx_len, bptt, 1.0 / int(mask[:, 1:].sum()))
    opt.step()
    return loss / n

step(min(T, 256))  # warm-up: first-call allocations
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
loss = step(T)
secs = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": secs, "tokens_per_s": T / secs, "peak_rss_mb": peak,
                  "rss_after_load_mb": rss_loaded, "loss": loss}, allow_nan=False))
"""


def run_case(ckpt: str, T: int, ctx_len: int, bptt: str, threads: int, timeout: float) -> dict:
    """One step in a fresh process; its JSON line, or the reason it gave none."""
    cmd = [sys.executable, "-c", CHILD, ckpt, str(T), str(ctx_len), bptt, str(threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--ctx-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["full", "truncated"], choices=["full", "truncated"])
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per case before it is given up")
    ap.add_argument("--small", action="store_true", help="a 2-layer width-64 model (a smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from statetune.model.random_init import random_checkpoint

    shape = dict(n_layer=2, n_embd=64, head_size=32, vocab_size=1000, dim_ffn=128,
                 lora={"w": 8, "a": 8, "v": 8, "g": 8}) if args.small else SHAPE
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "model.pth")
        torch.save(random_checkpoint("rwkv7", **shape, seed=0), ckpt)
        for T in args.lengths:
            for mode in args.modes:
                res = run_case(ckpt, T, args.ctx_len, mode, args.threads, args.timeout)
                results[f"{T}/{mode}"] = res
                print(json.dumps({"tokens": T, "bptt": mode, **res}, allow_nan=False), file=sys.stderr, flush=True)
                if args.out:  # after every case, so a run stopped midway keeps what it measured
                    _save(args, shape, results, {})
    for T in args.lengths:
        for mode in args.modes:
            r = results[f"{T}/{mode}"]
            rows.append((f"{T} tokens, {mode}", r.get("error") or
                         f"{r['tokens_per_s']:.1f} tokens/s, {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                         f"(after load {r['rss_after_load_mb']:.0f} MB)"))
    summary = {}
    ok = lambda k: k in results and "error" not in results[k]  # noqa: E731
    for T in args.lengths:
        if ok(f"{T}/full") and ok(f"{T}/truncated"):
            summary[f"full / truncated tokens/s at {T}"] = (results[f"{T}/full"]["tokens_per_s"]
                                                           / results[f"{T}/truncated"]["tokens_per_s"])
    lo, hi = min(args.lengths), max(args.lengths)
    for mode in args.modes:
        if ok(f"{lo}/{mode}") and ok(f"{hi}/{mode}"):
            summary[f"{mode}: peak RSS at {hi} / at {lo}"] = (results[f"{hi}/{mode}"]["peak_rss_mb"]
                                                             / results[f"{lo}/{mode}"]["peak_rss_mb"])
    rows += [(k, f"{v:.2f}") for k, v in summary.items()]
    print_rows(rows)
    if args.out:
        _save(args, shape, results, summary)


def _save(args: argparse.Namespace, shape: dict, results: dict, summary: dict) -> None:
    write_json({"command": "python benchmarks/bench_long.py " + " ".join(sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(), "threads": args.threads,
                "ctx_len": args.ctx_len, "shape": shape, "cases": results, "summary": summary}, args.out)


if __name__ == "__main__":
    main()
