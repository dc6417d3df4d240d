"""Load test of ``statetune serve``: N concurrent streaming clients spread over K states, on loopback.

    python benchmarks/bench_serve.py [--clients 32] [--states 8] [--duration 20] [--max-tokens 64]
        [--server-threads 1] [--rounds 1] [--out benchmarks/results/serve.json]
    python benchmarks/bench_serve.py --scenario ray [--ray-states 100] ...   (serve --ray; see serve_ray_scenario.py)

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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from benchio import print_rows, write_json

import statetune
import statetune.tuning.statefile
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


def start_server(ckpt: Path, states: Path, args: argparse.Namespace, *extra: str
                 ) -> tuple[subprocess.Popen, str, int]:
    """``statetune serve`` on a free loopback port; returns the process, host and port once it listens
    (``proc.startup_s``: seconds from launch to listening)."""
    cmd = [sys.executable, "-m", "statetune", "serve", "--model", str(ckpt), "--states", str(states),
           "--port", "0", "--threads", str(args.server_threads), "--max-batch-size", str(args.clients),
           "--max-tokens-limit", str(args.max_tokens), "--no-playground", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline, seen = time.monotonic() + 300, []
    for line in proc.stderr:
        seen = (seen + [line.rstrip()])[-20:]
        if "listening on http://" in line:
            proc.startup_s = time.perf_counter() - t0
            host, port = line.split("listening on http://")[1].split()[0].rsplit(":", 1)
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining
            return proc, host, int(port)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the server did not start: {' '.join(cmd)}\n" + "\n".join(seen))


async def one_request(host: str, port: int, body: bytes, path: str = "/v1/completions") -> dict[str, Any]:
    """Send one streamed completion (or chat completion); time to the first text, the text, generated tokens
    (from ``usage``), error."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"ttft": None, "tokens": 0, "error": None, "text": ""}
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
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
                elif chunk["choices"]:
                    c = chunk["choices"][0]
                    text = c["delta"].get("content") or "" if "delta" in c else c["text"]
                    if out["ttft"] is None and text:
                        out["ttft"] = time.perf_counter() - t0
                    out["text"] += text
        out["error"] = out["error"] or "stream ended without [DONE]"
        return out
    finally:
        writer.close()


async def run_phase(host: str, port: int, names: list[str], args: argparse.Namespace, spread: bool = False
                    ) -> dict[str, Any]:
    """``args.clients`` clients back to back for ``args.duration`` s, client i on state ``names[i % len]``
    (``spread``: every request on a state drawn uniformly from ``names``)."""
    results: list[dict[str, Any]] = []
    deadline = time.perf_counter() + args.duration

    async def client(i: int) -> None:
        rng = random.Random(i)  # client i sends the same prompts in every phase: the same load
        while time.perf_counter() < deadline:
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(8, 24)))
            name = rng.choice(names) if spread else names[i % len(names)]
            body = json.dumps({"model": name, "prompt": prompt, "max_tokens": args.max_tokens,
                               "temperature": args.temperature, "top_p": args.top_p, "stream": True,
                               "stream_options": {"include_usage": True}}, allow_nan=False).encode()
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
    return {"states": len(names), "seconds": seconds, "requests": len(ok), "errors": len(errors), "ttfts": ttft,
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
    ap.add_argument("--scenario", choices=("load", "chat", "states", "ray", "all"), default="all",
                    help="load: N clients over K states vs 1; chat: multi-turn TTFT with and without the prefix "
                         "cache; states: many states with few loaded vs one state; ray: serve --ray with 1 and 2 "
                         "replicas, state-affine vs random routing, a replica killed (not part of all; needs ray)")
    ap.add_argument("--ray-states", type=int, default=100, help="ray: states the requests are spread over")
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
    ap.add_argument("--users", type=int, default=8, help="chat: concurrent conversations")
    ap.add_argument("--turns", type=int, default=20, help="chat: turns per conversation")
    ap.add_argument("--no-cache-turns", type=int, default=None,
                    help="chat: turns of the run without the cache (default: --turns; it costs quadratically)")
    ap.add_argument("--turn-tokens", type=int, default=40, help="chat: words per message and most tokens per answer")
    ap.add_argument("--chat-shape", choices=("0.1b", "small"), default="0.1b",
                    help="chat: random weights of RWKV-7 0.1B's shapes (12 x 768, World vocabulary), or the "
                         "--layers/--width/--vocab model")
    ap.add_argument("--cache-mb", type=float, default=512, help="the server's --cache-mb (chat and states)")
    ap.add_argument("--many-states", type=int, default=1000, help="states: state files in the directory")
    ap.add_argument("--max-loaded-states", type=int, default=64, help="states: the server's --max-loaded-states")
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "benchmark": "serve", "server_threads": args.server_threads, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.scenario in ("load", "all"):
            result["load"] = load_scenario(Path(tmp) / "load", args)
        if args.scenario in ("chat", "all"):
            result["chat"] = chat_scenario(Path(tmp) / "chat", args)
        if args.scenario in ("states", "all"):
            result["states"] = states_scenario(Path(tmp) / "states", args)
        if args.scenario == "ray":
            from serve_ray_scenario import ray_scenario

            result["ray"] = ray_scenario(Path(tmp) / "ray", args)
    write_json(result, args.out)
    print(f"wrote {args.out}")


def load_scenario(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The streaming load test: every client on its own state (over K), then all on one state."""
    root.mkdir()
    ckpt, states_dir, names = write_model(root, args)
    proc, host, port = start_server(ckpt, states_dir, args, "--cache-mb", str(args.cache_mb))
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
    phases = [{k: v for k, v in p.items() if k != "ttfts"} for p in phases]

    def total(k: int, key: str) -> float:
        sel = [p for p in phases if p["states"] == k]
        return sum(p[key] for p in sel) / sum(p["seconds"] for p in sel)

    one, many = total(1, "tokens"), total(len(names), "tokens")
    summary = {"tokens_per_s_1_state": one, f"tokens_per_s_{len(names)}_states": many,
               "ratio_k_states_vs_1": many / one if one else None, "engine_only_tokens_per_s": baseline,
               "server_vs_engine": many / baseline if baseline else None}
    print_table(phases, summary, args)
    return {"model": {"version": "rwkv7", "random": True, "n_layer": args.layers, "n_embd": args.width,
                      "head_size": 64, "vocab_size": args.vocab},
            "clients": args.clients, "states": args.states, "duration_s": args.duration, "rounds": args.rounds,
            "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "phases": phases, "summary": summary}


def scrape(host: str, port: int) -> dict[str, float]:
    """The server's ``/metrics`` (unlabelled samples only), parsed by prometheus_client's own parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (``VmHWM``), in MiB; None where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def chat_scenario(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``args.users`` concurrent conversations of ``args.turns`` turns (a message of ``args.turn_tokens`` words,
    an answer of at most as many tokens, greedy), once with the prefix cache and once without: time to first
    token per turn, prefill tokens the cache saved, and whether both runs gave the same answers."""
    root.mkdir()
    shape = {"n_layer": 12, "n_embd": 768, "vocab": 65536} if args.chat_shape == "0.1b" else \
        {"n_layer": args.layers, "n_embd": args.width, "vocab": args.vocab}
    ckpt = root / "chat-model.pth"
    sd = random_checkpoint("rwkv7", n_layer=shape["n_layer"], n_embd=shape["n_embd"], head_size=64,
                           vocab_size=shape["vocab"], seed=0)
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, ckpt)  # half the bytes; served in fp32
    del sd
    model = statetune.load_model(ckpt)
    states = root / "states"
    states.mkdir()
    statetune.save_state(states / "persona.safetensors", random_states(model, 1)[0], model, with_shift=True)
    del model
    chat_args = argparse.Namespace(**{**vars(args), "clients": args.users, "max_tokens": args.turn_tokens})
    runs: dict[str, Any] = {}
    no_cache_turns = args.turns if args.no_cache_turns is None else min(args.turns, args.no_cache_turns)
    for label, cache_mb, turns in (("cache", args.cache_mb, args.turns), ("no_cache", 0, no_cache_turns)):
        proc, host, port = start_server(ckpt, states, chat_args, "--cache-mb", str(cache_mb))
        try:
            t0 = time.perf_counter()
            conversations = asyncio.run(converse(host, port, argparse.Namespace(**{**vars(args), "turns": turns})))
            seconds = time.perf_counter() - t0
            m = scrape(host, port)
        finally:
            proc.terminate()
            proc.wait(30)
        ttft = [[c[t]["ttft"] for c in conversations if c[t]["ttft"] is not None] for t in range(turns)]
        ttft += [[] for _ in range(args.turns - turns)]
        runs[label] = {
            "seconds": seconds, "ttft_median_s_per_turn": [statistics.median(x) if x else None for x in ttft],
            "errors": sum(r["error"] is not None for c in conversations for r in c),
            "answer_tokens_mean": statistics.mean(r["tokens"] for c in conversations for r in c),
            "prompt_tokens": m.get("statetune_prompt_tokens_total"),
            "prefill_tokens_saved": m.get("statetune_prefill_tokens_saved_total"),
            "cache_hits": m.get("statetune_cache_hits_total"), "cache_misses": m.get("statetune_cache_misses_total"),
            "answers": [[r["text"] for r in c] for c in conversations]}
        print(f"  chat {label}: {seconds:.0f} s", file=sys.stderr)
    with_cache, without = runs["cache"]["ttft_median_s_per_turn"], runs["no_cache"]["ttft_median_s_per_turn"]
    last = no_cache_turns - 1
    summary = {f"turn{args.turns}_vs_turn2_with_cache": ratio(with_cache[-1], with_cache[1]),
               f"turn{no_cache_turns}_vs_turn2_without_cache": ratio(without[last], without[1]),
               f"turn{no_cache_turns}_without_vs_with_cache": ratio(without[last], with_cache[last]),
               "prefill_tokens_saved": runs["cache"]["prefill_tokens_saved"],
               "prompt_tokens": runs["cache"]["prompt_tokens"],
               "same_answers_with_and_without_cache": [c[:no_cache_turns] for c in runs["cache"]["answers"]]
               == runs["no_cache"]["answers"]}
    for run in runs.values():
        del run["answers"]
    print(f"\n{args.users} conversations x {args.turns} turns ({args.turn_tokens} words in, <= {args.turn_tokens} "
          f"tokens out, greedy), RWKV-7 {shape['n_layer']}x{shape['n_embd']} (vocab {shape['vocab']}), server "
          f"threads {args.server_threads}\n")
    print("| turn | TTFT with cache (median ms) | TTFT without cache (median ms) |")
    print("|---:|---:|---:|")
    for t in sorted({0, 1, 2, 4, 9, 14, no_cache_turns - 1, args.turns - 1} & set(range(args.turns))):
        print(f"| {t + 1} | {ms(with_cache[t])} | {ms(without[t])} |")
    print_rows([(k, str(v if not isinstance(v, float) else round(v, 3))) for k, v in summary.items()])
    return {"model": shape, "users": args.users, "turns": args.turns, "no_cache_turns": no_cache_turns,
            "turn_tokens": args.turn_tokens,
            "cache_mb": args.cache_mb, "runs": runs, "summary": summary}


async def converse(host: str, port: int, args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    """Every user's conversation, concurrently; each turn sends the whole history (as OpenAI clients do)."""

    async def user(u: int) -> list[dict[str, Any]]:
        rng, history, turns = random.Random(1000 + u), [], []
        for _ in range(args.turns):
            history.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=args.turn_tokens))})
            body = json.dumps({"model": "persona", "messages": history, "max_tokens": args.turn_tokens,
                               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
                              allow_nan=False).encode()
            r = await asyncio.wait_for(one_request(host, port, body, "/v1/chat/completions"), 900)
            turns.append(r)
            history.append({"role": "assistant", "content": r["text"]})
        return turns

    return await asyncio.gather(*(user(u) for u in range(args.users)))


def states_scenario(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Requests spread uniformly over ``args.many_states`` states with ``--max-loaded-states``, against the
    same load on one state: throughput, peak RSS and start-up time of both servers."""
    root.mkdir()
    from safetensors.torch import save_file

    ckpt = root / "bench-model.pth"
    torch.save(random_checkpoint("rwkv7", n_layer=args.layers, n_embd=args.width, head_size=64,
                                 vocab_size=args.vocab, seed=0), ckpt)
    model = statetune.load_model(ckpt)
    one_dir, many_dir = root / "one", root / "many"
    one_dir.mkdir()
    many_dir.mkdir()
    statetune.save_state(one_dir / "s0.safetensors", random_states(model, 1)[0], model, with_shift=True)
    meta = {k: str(v) for k, v in statetune.tuning.statefile.model_metadata(model).items()}
    meta["format"] = "statetune-state/1"
    g = torch.Generator().manual_seed(5)
    L, H, N = model.config.n_layer, model.config.n_head, model.config.head_size
    for k in range(args.many_states):  # plain save_file: thousands of atomic, fsynced writes would take minutes
        t = {}
        for i in range(L):
            t[f"blocks.{i}.att.time_state"] = torch.randn(H, N, N, generator=g) * 0.5
            t[f"blocks.{i}.att.time_shift"] = torch.randn(H * N, generator=g)
            t[f"blocks.{i}.ffn.time_shift"] = torch.randn(H * N, generator=g)
        save_file(t, str(many_dir / f"u{k:04d}.safetensors"), metadata=meta)
    from statetune.serve.registry import Registry
    from statetune.tokenizer import tokenizer_for_vocab

    t0 = time.perf_counter()  # the index alone, in this process (a server's start-up adds imports and the model)
    Registry(model, tokenizer_for_vocab(args.vocab), "base", many_dir, args.max_loaded_states).reload()
    index_s = time.perf_counter() - t0
    del model
    names = {"one": ["s0"], "many": [f"u{k:04d}" for k in range(args.many_states)]}
    servers: dict[str, tuple[subprocess.Popen, str, int]] = {}
    out: dict[str, Any] = {}
    try:  # both servers stay up and the phases alternate, so a busy machine weighs on both alike
        for label, d in (("one", one_dir), ("many", many_dir)):
            servers[label] = start_server(ckpt, d, args, "--max-loaded-states", str(args.max_loaded_states),
                                          "--cache-mb", str(args.cache_mb))
            _, host, port = servers[label]
            asyncio.run(run_phase(host, port, names[label], argparse.Namespace(**{**vars(args), "duration": 1.0}),
                                  spread=True))
        phases: dict[str, list[dict[str, Any]]] = {"one": [], "many": []}
        for _ in range(args.rounds):
            for label in ("one", "many"):
                _, host, port = servers[label]
                phases[label].append(asyncio.run(run_phase(host, port, names[label], args, spread=True)))
                print(f"  {label}: {phases[label][-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
        for label, (proc, host, port) in servers.items():
            m, sel = scrape(host, port), phases[label]
            seconds = sum(p["seconds"] for p in sel)
            ttft = sorted(t for p in sel for t in p["ttfts"])
            out[label] = {"phases": [{k: v for k, v in p.items() if k != "ttfts"} for p in sel],
                          "tokens_per_s": sum(p["tokens"] for p in sel) / seconds,
                          "requests": sum(p["requests"] for p in sel), "errors": sum(p["errors"] for p in sel),
                          "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
                          "startup_s": proc.startup_s, "peak_rss_mb": peak_rss_mb(proc.pid),
                          "state_loads": m.get("statetune_state_loads_total"),
                          "loaded_states": m.get("statetune_loaded_states"),
                          "cache_bytes": m.get("statetune_cache_bytes")}
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    one, many = out["one"], out["many"]
    cache_mib = (many["cache_bytes"] or 0) / (1 << 20)
    summary = {"throughput_many_vs_one": ratio(many["tokens_per_s"], one["tokens_per_s"]),
               "peak_rss_many_vs_one": ratio(many["peak_rss_mb"], one["peak_rss_mb"]),
               "peak_rss_many_vs_one_plus_cache": ratio(many["peak_rss_mb"], (one["peak_rss_mb"] or 0) + cache_mib),
               "startup_s_one": one["startup_s"], "startup_s_many": many["startup_s"],
               f"index_{args.many_states}_files_s": index_s}
    print(f"\n{args.many_states} states (--max-loaded-states {args.max_loaded_states}) vs 1, {args.clients} clients, "
          f"requests spread uniformly, random RWKV-7 {args.layers}x{args.width}\n")
    print("| server | tokens/s | requests | errors | TTFT p50 ms | TTFT p99 ms | start-up s | peak RSS MiB | loads |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in out.items():
        print(f"| {label} | {r['tokens_per_s']:.0f} | {r['requests']} | {r['errors']} | {ms(r['ttft_p50_s'])} | "
              f"{ms(r['ttft_p99_s'])} | {r['startup_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['state_loads']:.0f} |")
    print_rows([(k, str(round(v, 3) if isinstance(v, float) else v)) for k, v in summary.items()])
    return {"model": {"n_layer": args.layers, "n_embd": args.width, "vocab_size": args.vocab},
            "states": args.many_states, "max_loaded_states": args.max_loaded_states, "clients": args.clients,
            "duration_s": args.duration, "servers": out, "summary": summary}


def random_states(model, n: int) -> list[RWKVState]:
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(100 + k)
        z = model.zero_state(1)
        out.append(RWKVState(torch.randn(z.att_shift.shape, generator=g), torch.randn(z.wkv.shape, generator=g) * 0.5,
                             torch.randn(z.ffn_shift.shape, generator=g)))
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


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
