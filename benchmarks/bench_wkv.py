"""Benchmark the chunked WKV kernels against the sequential reference loop (RWKV-7 and RWKV-6).

Times forward+backward with gradients into every input and the initial state, forward+backward with only
the initial state requiring grad (state tuning), and forward-only, for the chunked path at several chunk
sizes and for the reference loop, interleaved in one run so that load on a shared machine hits both
alike; reports the best of ``--repeats`` runs. Prints a table and writes JSON.

Usage: ``python benchmarks/bench_wkv.py [--threads 2] [--device cpu] [--repeats 5] [--out PATH]``
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from benchio import write_json

from statetune.ops.chunked6 import DEFAULT_CHUNK_SIZE6, wkv6_chunked
from statetune.ops.chunked7 import DEFAULT_CHUNK_SIZE7, wkv7_chunked
from statetune.ops.reference import wkv6_reference, wkv7_reference

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "wkv.json"


def make_inputs(B: int, T: int, H: int, N: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Realistic random inputs: RWKV-7-style decays and ``a = -kk``, ``b = kk * gate``."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    kk = F.normalize(rnd(B, T, H, N), dim=-1)
    x = {
        "r": rnd(B, T, H, N), "k": rnd(B, T, H, N) * 0.5, "v": rnd(B, T, H, N),
        "w": -0.6065306597126334 * torch.sigmoid(rnd(B, T, H, N)),
        "a": -kk, "b": kk * torch.sigmoid(rnd(B, T, H, N)),
        "u": rnd(H, N) * 0.5, "state": rnd(B, H, N, N) * 0.1,
    }
    return {k: v.to(device).requires_grad_() for k, v in x.items()}


def timed(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call, synchronising CUDA if needed."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (best is reported)")
    p.add_argument("--ref-repeats", type=int, default=2, help="timed runs of the (slow) reference loop")
    p.add_argument("--chunks", default="16,32,64", help="chunk sizes to time, comma-separated")
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=12)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    chunks = [int(c) for c in args.chunks.split(",")]
    x = make_inputs(args.B, args.T, args.H, args.N, args.device)
    # state tuning: a frozen model's activations, only the initial state is trained
    x_state = {k: v.detach() if k != "state" else v for k, v in x.items()}

    def run7(impl: Callable, inputs: dict[str, torch.Tensor], **kw: int) -> tuple[torch.Tensor, torch.Tensor]:
        return impl(*(inputs[n] for n in ("r", "w", "k", "v", "a", "b", "state")), **kw)

    def run6(impl: Callable, inputs: dict[str, torch.Tensor], **kw: int) -> tuple[torch.Tensor, torch.Tensor]:
        return impl(*(inputs[n] for n in ("r", "w", "k", "v", "u", "state")), **kw)

    versions = {
        "rwkv7": (run7, wkv7_chunked, wkv7_reference, DEFAULT_CHUNK_SIZE7),
        "rwkv6": (run6, wkv6_chunked, wkv6_reference, DEFAULT_CHUNK_SIZE6),
    }
    Fn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]

    def fwd_bwd(fn: Fn, inputs: dict[str, torch.Tensor]) -> None:
        y, s = fn(inputs)
        (y.square().mean() + s.square().mean()).backward()

    def fwd(fn: Fn) -> None:
        with torch.no_grad():
            fn(x)

    modes = {"fwd_bwd": lambda fn: fwd_bwd(fn, x), "state_bwd": lambda fn: fwd_bwd(fn, x_state), "fwd": fwd}
    results: dict[str, dict] = {}
    for name, (call, chunked, reference, default_chunk) in versions.items():
        cases: dict[str, Fn] = {"reference": functools.partial(call, reference)}
        for c in chunks:
            cases[f"chunked{c}"] = functools.partial(call, chunked, chunk_size=c)
        for fn in cases.values():          # warm-up
            fwd_bwd(fn, x)
        times: dict[str, dict[str, list[float]]] = {c: {m: [] for m in modes} for c in cases}
        for i in range(args.repeats):      # interleaved, so machine load hits every case alike
            for case, fn in cases.items():
                if case == "reference" and i >= args.ref_repeats:
                    continue
                for mode, run in modes.items():
                    times[case][mode].append(timed(lambda run=run, fn=fn: run(fn), args.device))
        best = {c: {m: min(v) for m, v in t.items()} for c, t in times.items()}
        ref = best["reference"]
        results[name] = {
            "default_chunk_size": default_chunk,
            "cases": {c: {**{f"{m}_ms": 1e3 * b[m] for m in modes}, **{f"speedup_{m}": ref[m] / b[m] for m in modes}}
                      for c, b in best.items()},
        }

    shape = f"B={args.B} T={args.T} H={args.H} N={args.N}"
    print(f"WKV fp32 on {args.device}, {args.threads} threads, {shape}; best of {args.repeats} "
          f"(reference: {min(args.repeats, args.ref_repeats)})")
    print(f"{'version':8} {'impl':12} {'fwd+bwd ms':>11} {'speed-up':>9} {'state-grad ms':>14} {'speed-up':>9} "
          f"{'fwd ms':>9} {'speed-up':>9}")
    for name, res in results.items():
        for case, r in res["cases"].items():
            mark = " *" if case == f"chunked{res['default_chunk_size']}" else ""
            print(f"{name:8} {case:12} {r['fwd_bwd_ms']:11.1f} {r['speedup_fwd_bwd']:8.1f}x "
                  f"{r['state_bwd_ms']:14.1f} {r['speedup_state_bwd']:8.1f}x "
                  f"{r['fwd_ms']:9.1f} {r['speedup_fwd']:8.1f}x{mark}")
    print("fwd+bwd: gradients of every input; state-grad: only the initial state requires grad (state "
          "tuning); fwd: no grad")
    print("(* = default chunk size)")
    meta = {"device": args.device, "threads": args.threads, "shape": shape, "repeats": args.repeats,
            "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}   # others' work skews timings
    write_json({"meta": meta, "results": results}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
