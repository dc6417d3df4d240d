"""One writer at a time: an exclusive lock on a lock file, for a run folder or a set of output files.

One mechanism, two ways to use it:

- *held* (``wait=False``), for a training run's folder: taken for the whole run without waiting; a second
  process gets a :class:`LockedError` naming the holder (process id, host, start time, command), which the
  holder writes into the lock file;
- *waiting* (``wait=True``), held only while a set of files is replaced (``eval``'s report, ``prepare``'s
  outputs, a state the server persists, a benchmark's results file): a second writer waits its turn.

The lock is ``fcntl.flock`` on the lock file. The kernel releases it when its process ends, however it
ends (SIGKILL, a crash, power loss), so a lock file left behind by a killed process is free for the next
one: there is nothing stale to detect or break, and taking it over only logs whose it was. A holder that
ends normally removes the lock file while it still holds it; a process that was waiting on the removed file
notices (the path no longer names the file it locked) and locks the new one instead. Locks work across
processes of one machine, and across machines on file systems that support them (NFS maps ``flock`` onto
its own byte-range locks). The ``filelock`` package locks the same way but can only say that the lock
timed out, not who holds it, which is the one thing a refused run's message needs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import stat
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from statetune.errors import StatetuneError
from statetune.fileio import make_parent

log = logging.getLogger("statetune")
#: How long a process that finds the lock held waits for the holder's identity to appear in the lock file
#: (the holder writes it right after locking), or for a brief probe (:func:`holder`) to let go.
SETTLE_S = 1.0


class LockedError(StatetuneError):
    """Another process holds the lock; ``holder`` is what it wrote into the lock file (may be empty)."""

    def __init__(self, message: str, path: Path, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


def identity() -> dict[str, Any]:
    """Who this process is, as a holder writes it into its lock file."""
    argv = list(sys.argv) or ["python"]
    prog = Path(argv[0]).name
    if prog == "__main__.py":  # python -m statetune
        prog = Path(argv[0]).parent.name
    command = " ".join(shlex.quote(a) for a in [prog, *argv[1:]]).replace("\n", "\\n")
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().astimezone().isoformat(
        timespec="seconds"), "command": command[:300]}


def describe(holder: dict[str, Any]) -> str:
    """``holder`` in words, for one line of an error message."""
    if not holder.get("pid"):
        return "another process (which has not yet recorded who it is)"
    words = f"process {holder['pid']}"
    if holder.get("host"):
        words += f" on {holder['host']}"
    if holder.get("started"):
        words += f", started {holder['started']}"
    if holder.get("command"):
        words += f", running `{holder['command']}`"
    return words


class FileLock:
    """An exclusive lock on the file ``path`` (created, with its folder, as needed); see the module docstring.

    ``busy`` is the message of the :class:`LockedError` a non-waiting lock raises when the lock is held; its
    ``{holder}`` is replaced by :func:`describe` of the holder. Use as a context manager, or call
    :meth:`acquire` and :meth:`release` (releasing twice, or a lock never acquired, does nothing).
    """

    def __init__(self, path: str | Path, *, wait: bool, busy: str = "{path} is locked by {holder}") -> None:
        self.path = Path(path)
        self.wait = wait
        self.busy = busy
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FileLock:
        """Take the lock (waiting for it with ``wait``; otherwise raising :class:`LockedError`)."""
        if self._fd is not None:
            return self
        deadline = time.monotonic() + SETTLE_S
        while True:
            make_parent(self.path)
            try:
                fd = _open_lock_file(self.path)
            except FileNotFoundError:  # the folder was removed between the two calls: make it again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                found = _read(fd)
                os.close(fd)
                if _settled(found) or time.monotonic() > deadline:
                    message = self.busy.replace("{path}", str(self.path)).replace("{holder}", describe(found))
                    raise LockedError(message, self.path, found) from None
                time.sleep(0.05)  # the holder is still writing who it is, or a probe is looking
                continue
            except BaseException:
                os.close(fd)
                raise
            if _names(self.path, fd):
                break
            os.close(fd)  # the holder removed this file as it let go: lock the one at the path now
        left = _read(fd)
        if left.get("pid"):
            log.info("%s: taking over the lock left by %s, which ended without releasing it", self.path,
                     describe(left))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(identity(), allow_nan=False) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and let go of the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if _names(self.path, fd):
                    self.path.unlink()
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


def holder(path: str | Path) -> dict[str, Any] | None:
    """Who holds the lock on ``path`` now (what it wrote; ``{}`` if nothing yet), or None when it is free.

    A probe for messages and tests: the answer may be out of date as soon as it is given.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def waiting(path: str | Path) -> Iterator[None]:
    """Hold the lock on ``path`` for the block, waiting for another holder to finish first."""
    with FileLock(path, wait=True):
        yield


def lock_beside(path: str | Path) -> Path:
    """The lock file that guards writes of ``path`` (a hidden file beside it, removed after each write)."""
    p = Path(path)
    return p.parent / f".{p.name}.lock"


def _open_lock_file(path: Path) -> int:
    """Open (or create) the lock file ``path``, which must be a regular file: never through a symbolic link
    (its holder truncates and writes the file, which would damage the link's target), and never a FIFO,
    device or directory someone put there."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        fd = None
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    if fd is not None:
        os.close(fd)
    kind = "a symbolic link" if path.is_symlink() else "a directory" if path.is_dir() else "not a regular file"
    raise StatetuneError(f"{path}: this lock file is {kind}; statetune creates it as a plain file and removes it "
                         "after use, so it was put there by something else: remove it and run again")


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing holder removes it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read(fd: int) -> dict[str, Any]:
    """What a holder wrote into the lock file (``{}``: nothing yet, or not readable)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _settled(found: dict[str, Any]) -> bool:
    """Whether ``found`` names a live holder: not empty (still being written) and, on this machine, running."""
    pid = found.get("pid")
    if not isinstance(pid, int):
        return False
    if found.get("host") != socket.gethostname() or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # a previous holder's record; the real holder is a brief probe, or about to write
    except PermissionError:
        return True
    return True
