"""Generation throughput: 64 prompts batched vs one at a time, and decode with vs without a state.

Runs the batched engine on a random RWKV-7 (default: 6 layers, width 512, World-size vocabulary) so the
numbers reflect statetune's decoding, not a particular model. Prints a table and writes JSON.

    python benchmarks/bench_generate.py --threads 2 --out benchmarks/results/generate.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from benchio import print_rows, write_json

from statetune.infer.engine import Engine
from statetune.infer.sampling import SamplingParams
from statetune.model.checkpoint import load_model
from statetune.model.random_init import random_checkpoint
from statetune.model.state import RWKVState
from statetune.tokenizer import get_tokenizer


def run_engine(model, tok, prompts, state, max_tokens: int, batch: int) -> tuple[float, int]:
    """Seconds and generated tokens for all prompts with at most ``batch`` sequences decoding together."""
    engine = Engine(model, tok, max_batch_size=batch)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add(p, state, params)
    tokens = 0
    while len(engine):
        tokens += sum(1 for d in engine.step() if d.token is not None)
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/generate.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = get_tokenizer("world")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.pth"
        torch.save(random_checkpoint("rwkv7", n_layer=args.layers, n_embd=args.width, head_size=64), path)
        model = load_model(path, device=args.device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 60000, (int(n),), generator=g).tolist()
               for n in torch.randint(8, 40, (args.prompts,), generator=g)]
    s = model.zero_state(1)
    state = RWKVState(torch.randn_like(s.att_shift), torch.randn_like(s.wkv), torch.randn_like(s.ffn_shift))
    run_engine(model, tok, prompts[:2], None, 4, 2)  # warm-up
    t_one, n_one = run_engine(model, tok, prompts, None, args.max_tokens, 1)
    # with and without a state alternate, best of two each: on a shared CPU, whichever runs later in a
    # sequence can be slower for reasons of its own (a single ordered run once showed a -13% "state cost")
    runs: dict[str, list[tuple[float, int]]] = {"none": [], "state": []}
    for order in (("none", "state"), ("state", "none")):
        for key in order:
            runs[key].append(run_engine(model, tok, prompts, None if key == "none" else state, args.max_tokens,
                                        args.prompts))
    t_batch, n_batch = min(runs["none"])
    t_state, n_state = min(runs["state"])
    res = {"threads": args.threads, "prompts": args.prompts, "max_tokens": args.max_tokens,
           "model": {"layers": args.layers, "width": args.width, "vocab": 65536},
           "one_at_a_time_tokens_per_s": n_one / t_one, "batched_tokens_per_s": n_batch / t_batch,
           "batched_with_state_tokens_per_s": n_state / t_state, "speedup": (n_batch / t_batch) / (n_one / t_one),
           "state_overhead": (n_batch / t_batch) / (n_state / t_state) - 1}
    rows = [("one at a time (tokens/s)", f"{res['one_at_a_time_tokens_per_s']:.1f}"),
            (f"batched, {args.prompts} prompts (tokens/s)", f"{res['batched_tokens_per_s']:.1f}"),
            ("speed-up", f"{res['speedup']:.1f}x"),
            ("batched with a state (tokens/s)", f"{res['batched_with_state_tokens_per_s']:.1f}"),
            ("cost of the state", f"{res['state_overhead']:+.1%}")]
    print_rows(rows)
    write_json(res, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
