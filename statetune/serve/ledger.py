"""The server's own record of the state files it wrote: what ``DELETE /v1/states/NAME`` may remove.

A state file cannot vouch for itself: its metadata (``created_by: api``) travels with every copy, so an
operator's file copied into the states directory would say the same. Authority comes from this ledger
instead, ``.statetune-api-states.json`` in the states directory (hidden, so no scan serves it), which the
server writes (atomically) when it persists a state and reads on start-up, so persisted states stay
deletable across restarts. A file is the server's only while it is the very file written: same name, same
inode and device, same size and modification time, and, checked again before deleting, the same SHA-256. A
file copied in, or replaced (``cp`` over it, ``mv`` onto it), does not match and is never deletable.
A ledger that cannot be read counts as empty: nothing becomes deletable by accident. So does one that
someone else could have written: it must be a regular file (not a symbolic link) owned by the server's own
user and writable by nobody else, and the server writes it so (``0600``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from statetune.fileio import atomic_write

log = logging.getLogger("statetune.serve")
LEDGER = ".statetune-api-states.json"
FORMAT = "statetune-api-states/1"


def file_identity(path: Path, digest: bool = True) -> dict[str, Any]:
    """What identifies this version of ``path``: inode, device, size, modification time (and SHA-256)."""
    st = os.stat(path, follow_symlinks=False)
    ident: dict[str, Any] = {"inode": st.st_ino, "device": st.st_dev, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if digest:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        ident["sha256"] = h.hexdigest()
    return ident


class Ledger:
    """Name → identity of each state file the API wrote in ``states_dir`` (and has not deleted)."""

    def __init__(self, states_dir: Path) -> None:
        self.dir = states_dir
        self.path = states_dir / LEDGER
        self.records = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(_read_own_file(self.path))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("%s: cannot read the record of the states this server wrote (%s); none of them can be "
                        "deleted over the API", self.path, e)
            return {}
        records = data.get("states") if isinstance(data, dict) and data.get("format") == FORMAT else None
        if not isinstance(records, dict):
            log.warning("%s: not a %s file; no state can be deleted over the API", self.path, FORMAT)
            return {}
        return {k: v for k, v in records.items() if isinstance(v, dict)}

    def _write(self) -> None:
        text = json.dumps({"format": FORMAT, "states": self.records}, indent=1, sort_keys=True, allow_nan=False)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"), private=True)

    def owns(self, name: str, path: Path | None, digest: bool = False) -> bool:
        """Whether ``path`` is the file this server wrote as ``name`` (``digest``: check its contents too)."""
        record = self.records.get(name)
        if record is None or path is None or path.parent != self.dir or record.get("file") != path.name:
            return False
        try:
            ident = file_identity(path, digest)
        except OSError:
            return False
        return all(record.get(k) == v for k, v in ident.items())

    def count(self) -> int:
        """The files the API wrote that are still there unchanged."""
        return sum(self.owns(name, self.dir / r.get("file", "")) for name, r in self.records.items())

    def record(self, name: str, path: Path) -> None:
        """Note ``path`` (just written) as the API's state ``name``; records of files gone are dropped."""
        self.records = {n: r for n, r in self.records.items() if self.owns(n, self.dir / r.get("file", ""))}
        self.records[name] = {"file": path.name, **file_identity(path)}
        self._write()

    def forget(self, name: str) -> None:
        if self.records.pop(name, None) is not None:
            self._write()


def _read_own_file(path: Path) -> str:
    """The text of ``path`` if only this process's user could have written it; ``PermissionError`` (an
    ``OSError``, so the ledger counts as empty) for a symbolic link, a file of another owner or one that the
    group or others may write."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError(errno.EPERM, "not a regular file", str(path))
        if hasattr(os, "geteuid") and (st.st_uid != os.geteuid() or st.st_mode & 0o022):
            raise PermissionError(errno.EPERM, "owned or writable by another user than the server's", str(path))
        return f.read().decode("utf-8")
