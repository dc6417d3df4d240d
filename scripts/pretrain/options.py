"""The command line of ``scripts/pretrain_small.py`` and the flags that reproduce a run."""

from __future__ import annotations

import argparse

DESCRIPTION = ("Pretrain the tiny byte-level RWKV-7 that statetune ships, from scratch, on CPU, within a "
               "wall-clock budget.")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=DESCRIPTION,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--corpus", default=None, help="folder with train.txt, val.txt, sources.json "
                    "(default: corpus/ in the repository)")
    ap.add_argument("--out", default=None, help="where the shipped files go (default: "
                    "statetune/assets/tiny-rwkv7/ in the repository)")
    ap.add_argument("--work-dir", default=None, help="training state, metrics.jsonl, final.json (default: "
                    "runs/tiny-rwkv7/ in the repository)")
    ap.add_argument("--minutes", type=float, default=68.0, help="wall-clock training budget")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from WORK_DIR/train_state.pt if present")
    ap.add_argument("--finalize-only", action="store_true", help="skip training: write the outputs from "
                    "WORK_DIR/train_state.pt")
    ap.add_argument("--bench", default="", help="measure tokens/s of sizes like 4x256,6x256 and exit")
    size = ap.add_argument_group("model size")
    size.add_argument("--n-layer", type=int, default=6)
    size.add_argument("--n-embd", type=int, default=256)
    size.add_argument("--head-size", type=int, default=64)
    size.add_argument("--ffn-mult", type=float, default=4.0)
    size.add_argument("--vocab-size", type=int, default=257, help="257 = bytes + end of text (up to 1024)")
    opt = ap.add_argument_group("optimisation")
    opt.add_argument("--batch", type=int, default=16)
    opt.add_argument("--ctx", type=int, default=256)
    opt.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    opt.add_argument("--final-lr-frac", type=float, default=0.05, help="final LR as a fraction of the peak")
    opt.add_argument("--warmup", type=int, default=60, help="warmup steps")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--grad-clip", type=float, default=1.0)
    opt.add_argument("--max-logit-penalty", type=float, default=1e-4, help="L2Wrap factor (0 disables)")
    sched = ap.add_argument_group("schedule and logging")
    sched.add_argument("--measure-steps", type=int, default=8, help="steps timed before the first plan")
    sched.add_argument("--replan-every", type=int, default=25, help="revise the plan every N steps")
    sched.add_argument("--plan-window", type=int, default=50, help="steps whose median time plans the rest")
    sched.add_argument("--log-every", type=int, default=10)
    sched.add_argument("--eval-every-min", type=float, default=5.0)
    sched.add_argument("--save-every-min", type=float, default=4.0)
    sched.add_argument("--val-windows", type=int, default=32)
    sched.add_argument("--save-dtype", choices=("bf16", "fp32"), default="bf16")
    return ap


def reproduce_args(a: dict) -> str:
    """The command-line flags that reproduce a run (the non-default ones, and always the budget)."""
    defaults = vars(build_parser().parse_args([]))
    keep = ["threads", "minutes", "seed"]
    flags = []
    for key, value in a.items():
        if key in ("resume", "finalize_only", "bench", "out", "work_dir", "corpus", "device"):
            continue
        if key in keep or value != defaults.get(key):
            flags.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(flags)
