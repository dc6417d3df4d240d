"""Load test of ``statetune serve``: N concurrent streaming clients spread over K states, on loopback.

    python benchmarks/bench_serve.py [--clients 32] [--states 8] [--duration 20] [--max-tokens 64]
        [--server-threads 1] [--rounds 1] [--out benchmarks/results/serve.json]

The script writes a *random* small RWKV-7 (default 4 layers, width 256, head size 64, the 257-id byte
vocabulary: real checkpoints, even 0.1B, are too slow for a load test on a small CPU) and K random states
into a temporary directory, starts ``statetune serve`` on it as a subprocess on a free loopback port, and
runs two phases under the same load: every client on its own state (spread round-robin over K), then every
client on one state. Each client sends streamed ``/v1/completions`` requests back to back until the phase's
time is up (requests under way are finished). Reported per phase: requests/s, generated tokens/s (from the
``usage`` chunk), time to first token p50/p99 and errors; then the ratio of tokens/s with K states to 1
state (the goal is >= 0.9: different states cost nothing, the batch is the same) and, for scale, the
engine's own speed on the same workload (prefills included) without HTTP. ``--rounds`` alternates the phases more
times, to average out a busy machine.

The clients are a small asyncio HTTP/1.1 + server-sent-events reader (not the ``openai`` package) so that
they use as little of the CPU the server is measured on as possible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from benchio import write_json

import statetune
from statetune.model.random_init import random_checkpoint
from statetune.model.state import RWKVState

WORDS = ("the state of a recurrent model carries everything it has read so far into the next token and "
         "a tuned state steers the answers of a frozen model toward a task").split()


def write_model(root: Path, args: argparse.Namespace) -> tuple[Path, Path, list[str]]:
    """A random checkpoint and ``args.states`` random state files; returns their paths and the state names."""
    ckpt = root / "bench-model.pth"
    torch.save(random_checkpoint("rwkv7", n_layer=args.layers, n_embd=args.width, head_size=64,
                                 vocab_size=args.vocab, seed=0), ckpt)
    model = statetune.load_model(ckpt)
    states = root / "states"
    states.mkdir()
    names = []
    for k in range(args.states):
        g = torch.Generator().manual_seed(100 + k)
        z = model.zero_state(1)
        state = RWKVState(torch.randn(z.att_shift.shape, generator=g), torch.randn(z.wkv.shape, generator=g) * 0.5,
                          torch.randn(z.ffn_shift.shape, generator=g))
        statetune.save_state(states / f"s{k}.safetensors", state, model, with_shift=True)
        names.append(f"s{k}")
    return ckpt, states, names


def start_server(ckpt: Path, states: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, int]:
    """``statetune serve`` on a free loopback port; returns the process, host and port once it listens."""
    cmd = [sys.executable, "-m", "statetune", "serve", "--model", str(ckpt), "--states", str(states),
           "--port", "0", "--threads", str(args.server_threads), "--max-batch-size", str(args.clients),
           "--max-tokens-limit", str(args.max_tokens)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if "listening on http://" in line:
            host, port = line.split("listening on http://")[1].split()[0].rsplit(":", 1)
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining
            return proc, host, int(port)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the server did not start: {' '.join(cmd)}")


async def one_request(host: str, port: int, body: bytes) -> dict[str, Any]:
    """Send one streamed completion; time to the first text, generated tokens (from ``usage``), error."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"ttft": None, "tokens": 0, "error": None}
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        status = (await reader.readline()).split()
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            chunked |= line.lower().startswith(b"transfer-encoding: chunked")
        if len(status) < 2 or status[1] != b"200":
            out["error"] = f"HTTP {status[1:2]}"
            return out
        buffer = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                buffer += await reader.readexactly(size)
                await reader.readexactly(2)
            else:
                data = await reader.read(65536)
                if not data:
                    break
                buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                payload = event.removeprefix(b"data: ")
                if payload == b"[DONE]":
                    return out
                chunk = json.loads(payload)
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                elif chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
                elif out["ttft"] is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    out["ttft"] = time.perf_counter() - t0
        out["error"] = out["error"] or "stream ended without [DONE]"
        return out
    finally:
        writer.close()


async def run_phase(host: str, port: int, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """``args.clients`` clients back to back for ``args.duration`` s, client i on state ``names[i % len]``."""
    results: list[dict[str, Any]] = []
    deadline = time.perf_counter() + args.duration

    async def client(i: int) -> None:
        rng = random.Random(i)  # client i sends the same prompts in every phase: the same load
        while time.perf_counter() < deadline:
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(8, 24)))
            body = json.dumps({"model": names[i % len(names)], "prompt": prompt, "max_tokens": args.max_tokens,
                               "temperature": args.temperature, "top_p": args.top_p, "stream": True,
                               "stream_options": {"include_usage": True}}).encode()
            try:
                results.append(await asyncio.wait_for(one_request(host, port, body), 300))
            except (OSError, TimeoutError, ValueError) as e:
                results.append({"ttft": None, "tokens": 0, "error": f"{type(e).__name__}: {e}"})

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    seconds = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    errors = [r["error"] for r in results if r["error"] is not None]
    return {"states": len(names), "seconds": seconds, "requests": len(ok), "errors": len(errors),
            "first_errors": sorted(set(map(str, errors)))[:3], "tokens": sum(r["tokens"] for r in ok),
            "requests_per_s": len(ok) / seconds, "tokens_per_s": sum(r["tokens"] for r in ok) / seconds,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99)}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values`` (None when empty)."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def engine_baseline(ckpt: Path, args: argparse.Namespace) -> float:
    """Tokens/s of the engine alone on the same workload, without HTTP: ``args.clients`` sequences at a time,
    each finished one replaced by a new prompt (so prefills count, as in the server)."""
    from statetune.infer.engine import Engine
    from statetune.infer.sampling import SamplingParams
    from statetune.tokenizer import tokenizer_for_vocab

    threads = torch.get_num_threads()
    torch.set_num_threads(args.server_threads)
    rng = random.Random(0)
    try:
        model = statetune.load_model(ckpt)
        tok = tokenizer_for_vocab(args.vocab)
        engine = Engine(model, tok, max_batch_size=args.clients)
        generated, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min(10.0, args.duration):
            while len(engine) < args.clients:
                engine.add(tok.encode(" ".join(rng.choices(WORDS, k=rng.randint(8, 24)))), None,
                           SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens))
            generated += len(engine.step())
        return generated / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    ap.add_argument("--states", type=int, default=8, help="states the clients are spread over")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds each phase sends requests")
    ap.add_argument("--rounds", type=int, default=1, help="times to run the pair of phases (1 state, K states)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--layers", type=int, default=4, help="layers of the random model")
    ap.add_argument("--width", type=int, default=256, help="n_embd of the random model (heads of 64)")
    ap.add_argument("--vocab", type=int, default=257, help="257: byte tokenizer; 65536: World tokenizer")
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--no-baseline", action="store_true", help="skip the engine-only reference")
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, states_dir, names = write_model(Path(tmp), args)
        proc, host, port = start_server(ckpt, states_dir, args)
        try:
            asyncio.run(run_phase(host, port, names[:1], argparse.Namespace(**{**vars(args), "duration": 1.0})))
            phases = []
            for _ in range(args.rounds):
                for group in (names[:1], names):
                    phase = asyncio.run(run_phase(host, port, group, args))
                    phases.append(phase)
                    print(f"  {phase['states']} state(s): {phase['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(30)
        baseline = None if args.no_baseline else engine_baseline(ckpt, args)

    def total(k: int, key: str) -> float:
        sel = [p for p in phases if p["states"] == k]
        return sum(p[key] for p in sel) / sum(p["seconds"] for p in sel)

    one, many = total(1, "tokens"), total(len(names), "tokens")
    summary = {"tokens_per_s_1_state": one, f"tokens_per_s_{len(names)}_states": many,
               "ratio_k_states_vs_1": many / one if one else None, "engine_only_tokens_per_s": baseline,
               "server_vs_engine": many / baseline if baseline else None}
    print_table(phases, summary, args)
    result = {"benchmark": "serve", "model": {"version": "rwkv7", "random": True, "n_layer": args.layers,
                                              "n_embd": args.width, "head_size": 64, "vocab_size": args.vocab},
              "clients": args.clients, "states": args.states, "duration_s": args.duration, "rounds": args.rounds,
              "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "server_threads": args.server_threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(), "machine": platform.machine(), "phases": phases,
              "summary": summary}
    write_json(result, args.out)
    print(f"wrote {args.out}")


def print_table(phases: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    print(f"\n{args.clients} streaming clients, {args.max_tokens} tokens per answer, random RWKV-7 "
          f"{args.layers}x{args.width} (vocab {args.vocab}), server threads {args.server_threads}\n")
    print(f"| {'states':>6} | {'seconds':>7} | {'requests':>8} | {'req/s':>6} | {'tokens/s':>8} | "
          f"{'TTFT p50 ms':>11} | {'TTFT p99 ms':>11} | {'errors':>6} |")
    print(f"|{'-' * 8}|{'-' * 9}|{'-' * 10}|{'-' * 8}|{'-' * 10}|{'-' * 13}|{'-' * 13}|{'-' * 8}|")
    for p in phases:
        print(f"| {p['states']:>6} | {p['seconds']:>7.1f} | {p['requests']:>8} | {p['requests_per_s']:>6.2f} | "
              f"{p['tokens_per_s']:>8.0f} | {ms(p['ttft_p50_s']):>11} | {ms(p['ttft_p99_s']):>11} | "
              f"{p['errors']:>6} |")
    ratio = summary["ratio_k_states_vs_1"]
    print(f"\nthroughput with {args.states} states / 1 state: {ratio:.3f} (goal >= 0.9)" if ratio else "")
    if summary["engine_only_tokens_per_s"]:
        print(f"engine alone, same workload without HTTP: {summary['engine_only_tokens_per_s']:.0f} tokens/s; "
              f"server/engine: {summary['server_vs_engine']:.2f}")


if __name__ == "__main__":
    main()
