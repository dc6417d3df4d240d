"""Training checkpoints: everything needed to continue a run exactly, written atomically and integrity-checked.

A checkpoint ``checkpoints/step-N.pt`` holds the trainable tensors, the optimizer, the position in the data,
the best-so-far bookkeeping and a fingerprint of the data files; only tensors and plain Python values, so it
loads with ``weights_only=True``. Beside it, ``step-N.pt.sha256`` holds the SHA-256 of its bytes in the format
of ``sha256sum`` (so ``sha256sum -c`` verifies it by hand). The checksum is written first and the payload
renamed into place after it, so a payload without a checksum can only come from an older statetune.

On resume the newest checkpoint that is complete, matches its checksum and unpickles is used; every newer one
that is not is reported and set aside as ``step-N.pt.damaged``, so that pruning never keeps a damaged file in
place of a good one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from statetune.errors import CheckpointError
from statetune.fileio import atomic_write

log = logging.getLogger("statetune.train")

_NAME = re.compile(r"step-(\d+)\.pt$")
# Keys every checkpoint payload has (older ones may lack the later additions such as "data").
REQUIRED = ("step", "epoch", "batch_in_epoch", "tokens_seen", "best_val", "last_val", "baseline_val", "bad_evals",
            "elapsed", "tunable", "optimizer", "rng")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step-N.pt`` and its checksum atomically; delete all but the newest ``keep``."""
    path = checkpoint_dir(run_dir) / f"step-{step:08d}.pt"
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write(checksum_path(path), lambda tmp: Path(tmp).write_text(f"{digest}  {path.name}\n"))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


@dataclass
class Loaded:
    """A checkpoint's payload and where it came from."""

    path: Path
    payload: dict[str, Any]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint's payload, verified against its checksum; ``CheckpointError`` saying why it is unusable."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not data:
        raise CheckpointError(f"{path}: the file is empty")
    sums = checksum_path(path)
    if sums.is_file():
        try:
            expected = sums.read_text().split()[0].lower()
        except (OSError, UnicodeDecodeError, IndexError):
            raise CheckpointError(f"{sums}: the checksum file is unreadable") from None
        found = hashlib.sha256(data).hexdigest()
        if found != expected:
            raise CheckpointError(f"{path}: SHA-256 {found[:16]}... does not match {sums.name} "
                                  f"({expected[:16]}...): the file is truncated or corrupted")
    else:
        log.warning("%s has no checksum file (written by an older statetune): not verified", path)
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means the file is unusable
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if not isinstance(payload, dict) or (missing := [k for k in REQUIRED if k not in payload]):
        what = f"missing {', '.join(missing)}" if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a statetune training checkpoint ({what})")
    m = _NAME.search(path.name)
    if m and payload["step"] != int(m.group(1)):
        raise CheckpointError(f"{path}: holds step {payload['step']}, not the step its name says")
    return payload


def load_latest(run_dir: str | Path, set_aside: bool = True) -> Loaded | None:
    """The newest intact checkpoint, or None when the run has none at all.

    Damaged newer checkpoints are reported on stderr and (with ``set_aside``; only one process of a
    distributed run renames files) renamed ``*.damaged``; when every checkpoint is damaged, a
    ``CheckpointError`` lists what is wrong with each, and nothing is renamed.
    """
    problems: list[tuple[Path, CheckpointError]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            payload = read_checkpoint(path)
        except CheckpointError as e:
            problems.append((path, e))
            continue
        for bad, err in problems:
            if set_aside:
                _set_aside(bad)
            log.warning("skipping a damaged checkpoint: %s (kept as %s.damaged)", err, bad.name)
        if problems:
            log.warning("resuming from the newest intact checkpoint, %s", path)
        return Loaded(path, payload)
    if problems:
        details = "; ".join(str(e) for _, e in problems)
        raise CheckpointError(f"{run_dir}: no intact checkpoint to resume from ({details}); start a new run "
                              f"with --overwrite, or with --init STATE from one of its state files")
    return None


def _set_aside(path: Path) -> None:
    """Rename a damaged checkpoint (and its checksum) so it is neither resumed from nor counted as kept."""
    for p in (path, checksum_path(path)):
        if p.exists():
            p.replace(p.with_name(p.name + ".damaged"))
