"""``statetune serve --device cuda`` under 64 streaming clients: tokens/s and time to first token p50/p99.

The server, the random model and the clients are ``benchmarks/bench_serve.py``'s (its asyncio HTTP/SSE
reader): a random RWKV-7 of the 0.1B shape (12 x 768, World vocabulary) and K random states, every client
sending streamed completions back to back for ``--serve-seconds``, client i on state ``i % K``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

SHAPES = {"0.1B": (12, 768, 65536), "1.5B": (24, 2048, 65536), "tiny": (2, 64, 257)}


def part_serve(opts: Any) -> dict[str, Any]:
    import bench_serve

    layers, width, vocab = SHAPES["tiny" if opts.tiny else opts.serve_shape]
    args = argparse.Namespace(layers=layers, width=width, vocab=vocab, states=8, server_threads=opts.threads or 1,
                              clients=4 if opts.tiny else opts.serve_clients, max_tokens=16 if opts.tiny else 64,
                              temperature=1.0, top_p=0.9, duration=min(opts.serve_seconds, 3) if opts.tiny
                              else opts.serve_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, states, names = bench_serve.write_model(Path(tmp), args)
        proc, host, port = bench_serve.start_server(ckpt, states, args, "--device", opts.device)
        try:
            phase = asyncio.run(bench_serve.run_phase(host, port, names, args))
        finally:
            proc.kill()
            proc.wait(30)
    phase.pop("ttfts", None)
    return {"shape": "tiny" if opts.tiny else opts.serve_shape, "clients": args.clients, "states": args.states,
            "max_tokens": args.max_tokens, "startup_s": proc.startup_s, **phase}
