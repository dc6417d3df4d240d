"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the trainable tensors, the optimizer, the position in the data and the best-so-far
bookkeeping; only tensors and plain Python values, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from statetune.fileio import atomic_write

_NAME = re.compile(r"step-(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step-N.pt`` atomically and delete all but the newest ``keep``."""
    d = checkpoint_dir(run_dir)
    path = d / f"step-{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def load_latest(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint's payload, or None when the run has none yet."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    return torch.load(ckpts[-1], map_location="cpu", weights_only=True)
