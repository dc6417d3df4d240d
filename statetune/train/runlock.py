"""One writer per run folder: the lock a training run holds on its ``--out`` folder from start to end.

A run takes ``RUN/.train.lock`` (a :class:`statetune.locking.FileLock`) before it looks at the folder, and
lets go after its last file is written: a fresh run, ``--resume``, ``--overwrite`` and the ``--lr auto``
search alike. A second run into the same folder stops at once with an error naming the holder (exit 1), so
two runs can never interleave their metrics, checkpoints and config. The kernel releases the lock when its
process dies, so the lock file a killed run leaves behind does not stop ``--resume``.

Under torchrun, rank 0 takes the lock and makes the checks that decide whether the run may start; all ranks
learn the outcome together (:meth:`~statetune.train.distributed.Dist.worst`) before any of them loads a
model or writes a file, and if rank 0 could not start, every rank stops with an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from statetune.errors import USAGE, OptionError, StatetuneError
from statetune.locking import FileLock, LockedError, describe, holder
from statetune.train import rundir
from statetune.train.config import TrainConfig
from statetune.train.distributed import Dist

LOCK = ".train.lock"


def busy(run: Path, flag: str) -> str:
    """The error a second run gets (``{holder}`` is filled in by the lock)."""
    return (f"{flag} {run}: another training run is writing to this folder ({{holder}}); wait for it to end "
            f"(or stop it), or train into another --out")


def run_lock(run: str | Path, flag: str = "--out") -> FileLock:
    """The (not yet acquired) lock of the run folder ``run``."""
    return FileLock(Path(run) / LOCK, wait=False, busy=busy(Path(run), flag))


def check_free(run: str | Path, flag: str = "--resume") -> None:
    """Refuse early when a run is writing to ``run`` (before reading its config for ``--resume``); only a
    courtesy, the lock itself is taken by :func:`claimed`."""
    found = holder(Path(run) / LOCK)
    if found is not None:
        raise LockedError(busy(Path(run), flag).replace("{holder}", describe(found)), Path(run) / LOCK, found)


@contextlib.contextmanager
def claimed(config: TrainConfig, d: Dist, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold the run folder's lock for the block, once the folder may take this run (a fresh run into a folder
    holding another is refused unless ``overwrite``); see the module docstring for torchrun."""
    run = Path(config.out)
    flag = "--resume" if resume else "--out"
    lock = run_lock(run, flag)
    created = False
    error: Exception | None = None
    if d.main:
        try:
            if run.exists() and not run.is_dir():
                raise OptionError(f"{flag}: {run} exists and is not a directory")
            created = not run.exists()
            lock.acquire()
            if not resume:
                rundir.check_fresh(config, overwrite)
        except Exception as e:  # every rank must hear of it, or the others would wait for rank 0 forever
            error = e
    worst = d.worst(0 if error is None else getattr(error, "exit_code", 1))
    try:
        if error is not None:
            raise error
        if worst:
            kind = OptionError if worst == USAGE else StatetuneError
            raise kind(f"rank {d.rank}: rank 0 could not start the run in {run} (its error says why)")
        yield
    finally:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                run.rmdir()  # only if empty: a run that stopped before writing anything leaves no folder
