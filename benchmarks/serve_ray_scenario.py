"""``bench_serve.py --scenario ray``: ``statetune serve --ray`` with 1 and 2 replicas (one thread each), and 2
replicas routed by load alone (``--no-ray-affinity``), under the same load; then 2 replicas with one killed.

The load: ``--clients`` streaming clients, each request on a state drawn uniformly from ``--ray-states``
states, continuing that state's conversation (its last prompt and answer, plus new words; reset past a few
hundred bytes), so that a replica that served the state before has the prompt's beginning in its prefix
cache. Reported per server: tokens/s, time to first token p50/p99, errors, and the prefix cache's hit rate
and share of prompt tokens read from it (summed over the replicas' ``/metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import bench_serve as B

HOLDER = "ray::ServeReplica:statetune:StateReplica"


async def conversation_load(host: str, port: int, names: list[str], args: argparse.Namespace,
                            duration: float, kill_after: float | None = None, server_pid: int | None = None
                            ) -> dict[str, Any]:
    """The load for ``duration`` s; with ``kill_after``, one replica of ``server_pid`` is SIGKILLed then."""
    convs = {n: f"{n} says:" for n in names}
    results: list[dict[str, Any]] = []
    deadline = time.perf_counter() + duration
    killed: dict[str, Any] = {}

    async def client(i: int) -> None:
        rng = random.Random(i)
        while time.perf_counter() < deadline:
            name = rng.choice(names)
            prompt = convs[name] + " " + " ".join(rng.choices(B.WORDS, k=rng.randint(4, 10)))
            body = json.dumps({"model": name, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 1.0,
                               "top_p": 0.9, "stream": True, "stream_options": {"include_usage": True}},
                              allow_nan=False).encode()
            try:
                r = await asyncio.wait_for(B.one_request(host, port, body), 300)
            except (OSError, TimeoutError, ValueError) as e:
                r = {"ttft": None, "tokens": 0, "error": f"{type(e).__name__}: {e}", "text": ""}
            r["t"] = time.perf_counter()
            results.append(r)
            if r["error"] is None:
                convs[name] = prompt + r["text"] if len(prompt) < 400 else f"{name} says:"

    async def killer() -> None:
        await asyncio.sleep(kill_after)
        pids = replica_pids(server_pid)
        os.kill(pids[0], signal.SIGKILL)
        killed.update(pid=pids[0], t=time.perf_counter())

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(args.clients)), *([killer()] if kill_after else []))
    seconds = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    errors = [r["error"] for r in results if r["error"] is not None]
    out = {"seconds": seconds, "requests": len(ok), "errors": len(errors), "first_errors": sorted(set(errors))[:3],
           "tokens_per_s": sum(r["tokens"] for r in ok) / seconds, "ttft_p50_s": B.percentile(ttft, 50),
           "ttft_p99_s": B.percentile(ttft, 99)}
    if killed:
        out["ok_after_kill"] = sum(1 for r in ok if r["t"] > killed["t"])
    return out


def replica_pids(server_pid: int) -> list[int]:
    """The state replicas of the server ``server_pid`` (children of the raylet it started)."""
    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(HOLDER.encode()) \
                    and parent(parent(int(proc.name))) == server_pid:
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(pids)


def cache_totals(host: str, port: int, replicas: int) -> dict[str, float]:
    """Cache counters summed over the replicas (a scrape lands on one: scrape until each has answered)."""
    from prometheus_client.parser import text_string_to_metric_families

    pages: dict[str, dict[str, float]] = {}
    for _ in range(50 * replicas):
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as r:
            text, who = r.read().decode(), r.headers.get("x-statetune-replica")
        pages[who] = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
        if len(pages) == replicas:
            break
    keys = ("statetune_cache_hits_total", "statetune_cache_misses_total", "statetune_prefill_tokens_saved_total",
            "statetune_prompt_tokens_total")
    total = {k: sum(p.get(k, 0.0) for p in pages.values()) for k in keys}
    hits, misses = total["statetune_cache_hits_total"], total["statetune_cache_misses_total"]
    return {"replicas_scraped": len(pages), "cache_hits": hits, "cache_misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "prompt_tokens_from_cache": total["statetune_prefill_tokens_saved_total"]
            / total["statetune_prompt_tokens_total"] if total["statetune_prompt_tokens_total"] else None}


def ray_scenario(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    root.mkdir()
    ckpt, states_dir, names = B.write_model(root, argparse.Namespace(**{**vars(args), "states": args.ray_states}))
    runs: dict[str, Any] = {}
    for label, replicas, extra in (("1 replica", 1, ()), ("2 replicas", 2, ()),
                                   ("2 replicas, random routing", 2, ("--no-ray-affinity",))):
        proc, host, port = B.start_server(ckpt, states_dir, args, "--ray", "--replicas", str(replicas), *extra)
        try:
            asyncio.run(conversation_load(host, port, names, args, 2.0))  # warm-up: every replica answers once
            run = asyncio.run(conversation_load(host, port, names, args, args.duration))
            run.update(cache_totals(host, port, replicas), startup_s=proc.startup_s)
            if label == "2 replicas":
                run["kill"] = asyncio.run(conversation_load(host, port, names, args, args.duration,
                                                            args.duration / 3, proc.pid))
        finally:
            proc.terminate()
            proc.wait(60)
        runs[label] = run
        print(f"  {label}: {run['tokens_per_s']:.0f} tokens/s, hit rate {run['hit_rate']}", file=sys.stderr)
    one, two, rand = runs["1 replica"], runs["2 replicas"], runs["2 replicas, random routing"]
    summary = {"throughput_2_vs_1": B.ratio(two["tokens_per_s"], one["tokens_per_s"]),
               "hit_rate_affine": two["hit_rate"], "hit_rate_random": rand["hit_rate"],
               "errors_during_kill": two["kill"]["errors"], "requests_during_kill": two["kill"]["requests"],
               "ok_after_kill": two["kill"]["ok_after_kill"]}
    print(f"\n{args.clients} streaming clients over {args.ray_states} states, {args.max_tokens} tokens per answer, "
          f"random RWKV-7 {args.layers}x{args.width}, one thread per replica\n")
    print("| server | tokens/s | requests | errors | TTFT p50 ms | TTFT p99 ms | cache hit rate | prompt from cache |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in runs.items():
        print(f"| {label} | {r['tokens_per_s']:.0f} | {r['requests']} | {r['errors']} | {B.ms(r['ttft_p50_s'])} | "
              f"{B.ms(r['ttft_p99_s'])} | {pct(r['hit_rate'])} | {pct(r['prompt_tokens_from_cache'])} |")
    B.print_rows([(k, str(round(v, 3) if isinstance(v, float) else v)) for k, v in summary.items()])
    return {"model": {"n_layer": args.layers, "n_embd": args.width, "vocab_size": args.vocab},
            "states": args.ray_states, "clients": args.clients, "duration_s": args.duration, "runs": runs,
            "summary": summary}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"
