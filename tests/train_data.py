"""A tiny task for training tests: after ``Q: <word>\\nA:`` always answer `` ok!``, in byte tokens."""

from __future__ import annotations

import json
import random
from pathlib import Path


def record(word: str, answer: str = " ok!\n") -> dict:
    p, c = f"Q: {word}\nA:".encode(), answer.encode()
    return {"text": [b + 1 for b in p] + [b + 1 for b in c] + [0], "mask": [0] * len(p) + [1] * (len(c) + 1)}


def write_task(root: Path, n_train: int = 64, n_val: int = 16, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))) for _ in range(n_train + n_val)]
    train, val = root / "train.jsonl", root / "val.jsonl"
    train.write_text("".join(json.dumps(record(w)) + "\n" for w in words[:n_train]))
    val.write_text("".join(json.dumps(record(w)) + "\n" for w in words[n_train:]))
    return train, val
