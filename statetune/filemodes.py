"""The permissions statetune gives what it writes: those of an ordinary write under the process's umask.

Files get ``0666`` and directories ``0777``, less the umask (``0644``/``0755`` under the usual ``022``), so
that a server running as another user can read a state, a dataset or a converted model; a directory made in
a set-group-ID directory keeps that bit, as with ``mkdir``. Temporary files
and directories (``mkstemp``, ``mkdtemp``) start as ``0600``/``0700``, and some writer libraries write to a
temporary file of their own and rename it (safetensors' ``save_file``), so every writer in
:mod:`statetune.fileio` sets the mode here just before its output is renamed into place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def umask() -> int:
    """The process's umask: read from ``/proc`` where there is one (setting the umask to read it, even for a
    moment, would race with other threads creating files), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary ``open(path, "w")`` gives a new file: ``0666`` less the umask."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode an ordinary ``mkdir`` gives a new directory: ``0777`` less the umask."""
    return 0o777 & ~umask()


def give_normal_modes(path: str | Path) -> None:
    """Give ``path`` (and, for a directory, everything under it) the mode an ordinary write would have.

    Every writer goes through here before its rename: ``mkstemp``/``mkdtemp`` create ``0600``/``0700``,
    and writer libraries that write to their own temporary file and rename it (safetensors' ``save_file``)
    leave ``0600`` whatever the umask; a server running as another user could not read the result.
    """
    p = Path(path)
    files, dirs = file_mode(), dir_mode()
    if not p.is_dir():
        os.chmod(p, files)
        return
    for root, _, names in os.walk(p):  # links are left alone: a link's target is not ours to change
        # keep the set-group-ID bit the kernel gave a directory made inside a setgid one (as mkdir does), so
        # that what is later created in it keeps the shared group
        os.chmod(root, dirs | (os.stat(root).st_mode & stat.S_ISGID))
        for name in names:
            entry = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(entry).st_mode):
                os.chmod(entry, files)
