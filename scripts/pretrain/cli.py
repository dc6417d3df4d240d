"""``scripts/pretrain_small.py``'s entry point: train (or resume), then write the shipped files; or ``--bench``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .data import lm_loss
from .finish import finalize
from .loop import STATE_FILE, train
from .model import make_config, new_model
from .options import build_parser

REPO = Path(__file__).resolve().parents[2]


def bench(args: argparse.Namespace) -> None:
    """Training tokens/s of each ``LxC`` size in ``--bench`` (a few steps each, after one warm-up step)."""
    for spec in args.bench.split(","):
        n_layer, n_embd = (int(v) for v in spec.lower().split("x"))
        cfg = make_config(n_layer, n_embd, args.head_size, args.vocab_size, args.ffn_mult)
        model = new_model(cfg, args.seed, args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(1, 257, (args.batch, args.ctx + 1), device=args.device)
        times = []
        for _ in range(4):
            t0 = time.monotonic()
            logits, _ = model(x[:, :-1])
            lm_loss(logits, x[:, 1:], args.max_logit_penalty)[0].backward()
            opt.step()
            opt.zero_grad()
            times.append(time.monotonic() - t0)
        dt = float(np.median(times[1:]))
        n = sum(p.numel() for p in model.parameters())
        print(f"{spec}: {n / 1e6:.2f}M params, bf16 file {n * 2 / 1e6:.1f} MB, {dt:.2f} s/step, "
              f"{args.batch * args.ctx / dt:.0f} tokens/s, {args.minutes} min -> "
              f"{args.batch * args.ctx / dt * args.minutes * 60 / 1e6:.1f}M tokens", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # paths default to places in the repository, whatever the current directory
    args.corpus = str(Path(args.corpus) if args.corpus else REPO / "corpus")
    args.out = str(Path(args.out) if args.out else REPO / "statetune" / "assets" / "tiny-rwkv7")
    args.work_dir = str(Path(args.work_dir) if args.work_dir else REPO / "runs" / "tiny-rwkv7")
    torch.set_num_threads(args.threads)
    if args.bench:
        bench(args)
        return
    state_path = Path(args.work_dir) / STATE_FILE
    if not args.finalize_only:
        state_path = train(args)
    elif not state_path.is_file():
        raise SystemExit(f"--finalize-only: no {state_path}")
    finalize(args, state_path)
