"""Atomic outputs, shared by every module that writes a file.

A file is written under a temporary name beside its destination, flushed to disk (``fsync``), given the
permissions an ordinary ``open`` would (:mod:`statetune.filemodes`: ``0666`` less the umask, never
``mkstemp``'s ``0600``, so a server running as another user can read it) and renamed into place; the
directory is synced after the rename, so a power loss leaves the old file or the new one, never an empty
one. A directory output (:func:`atomic_dir`) is assembled and renamed the same way. On any failure (a full
disk, Ctrl-C, SIGTERM, which the CLI turns into the same interrupt) the temporary file is removed. A run
killed outright leaves its temporary file behind; the temporary name records the writer's process id, and
the next write of the same path removes those whose writer is gone. :class:`AtomicGroup` commits several
files at once: every destination is replaced, or none is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from statetune.errors import StatetuneError
from statetune.filemodes import file_mode, give_normal_modes
from statetune.outpaths import special_message


def temp_beside(path: str | Path, private: bool = False) -> Path:
    """A new empty temporary file in ``path``'s directory (created there; normal permissions, or ``0600``
    when ``private``)."""
    p = Path(path)
    make_parent(p)
    remove_stale_temps(p)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600 if private else file_mode())
    finally:
        os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A new temporary directory beside ``path`` for the caller to fill; when the block ends without error
    it gets normal modes (:func:`give_normal_modes`), its files are synced and it is renamed onto ``path``
    (absent or an empty directory); on any failure it is removed and ``path`` is untouched."""
    p = Path(path)
    make_parent(p)
    remove_stale_temps(p)
    tmp = Path(tempfile.mkdtemp(dir=p.parent, prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        yield tmp
        give_normal_modes(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        if p.is_dir():
            p.rmdir()
        os.replace(tmp, p)
        fsync_dir(p.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_parent(path: Path) -> None:
    """Create ``path``'s directory; a file in the way is an error that names it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((a for a in path.parents if a.exists() and not a.is_dir()), path.parent)
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write here: {blocker} is a file, not a directory",
                                 str(path)) from None


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove temporary files of ``path`` left by writers that no longer run; returns what was removed."""
    p = Path(path)
    removed = []
    try:
        candidates = list(p.parent.glob(f".{glob_escape(p.name)}.*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        pid = tmp.name[len(p.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                if tmp.is_dir() and not tmp.is_symlink():  # an unfinished :func:`atomic_dir`
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], object], private: bool = False) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a partial file (``private``:
    readable and writable by its owner only, ``0600``, whatever the umask)."""
    with AtomicGroup([path], private) as group, group.naming_destinations():
        tmp = str(group.temps[0])
        try:
            write(tmp)
        except Exception as e:
            io_error = as_os_error(e, tmp)
            if io_error is None:
                raise
            raise io_error from e


def as_os_error(exc: Exception, path: str) -> OSError | None:
    """The ``OSError`` behind a writer library's own error (safetensors, torch.save), if there is one.

    Those libraries report a full disk as their own exception types (``(os error 28)``, or a failed
    ``inline_container`` check); so that the CLI can say what happened, a failed write on a file system with
    no space left is reported as ``ENOSPC``.
    """
    if isinstance(exc, OSError):
        return None
    m = re.search(r"\(os error (\d+)\)", str(exc))
    code = int(m.group(1)) if m else None
    if code is None:
        try:
            st = os.statvfs(os.path.dirname(path) or ".")
        except (OSError, AttributeError):
            return None
        if st.f_bavail > 0:
            return None
        code = errno.ENOSPC
    return OSError(code, os.strerror(code), path)


def _renamed(exc: OSError, names: dict[str, str]) -> OSError:
    """``exc`` naming the destination a temporary file stands for (what the user asked to write)."""
    if exc.filename is None:  # a failed write or close on a file object: it names no file
        where: str | None = ", ".join(names.values())
    else:
        where = names.get(os.fsdecode(exc.filename))
    if not where:
        return exc
    new = type(exc)(exc.errno, exc.strerror, where)
    new.__traceback__ = exc.__traceback__
    return new


class AtomicGroup:
    """Temporary files for ``paths``; :meth:`commit` makes all of them replace their destinations, or none.

    The caller writes (and closes) each of ``temps`` and then commits; leaving the ``with`` block commits
    if nothing failed, and otherwise removes the temporary files. The commit first keeps a hard link to
    every existing destination, so that if one rename fails the ones already done are rolled back.
    """

    def __init__(self, paths: list[str | Path], private: bool = False) -> None:
        self.finals = [Path(p) for p in paths]
        self.private = private
        self.temps: list[Path] = []
        self._open = True
        try:
            for p in self.finals:
                if (message := special_message(p)) is not None:  # the same rule as every --out flag
                    raise StatetuneError(message)
                try:
                    self.temps.append(temp_beside(p, private))
                except OSError as e:
                    raise _renamed(e, {os.fsdecode(e.filename or ""): str(p)}) from None
        except BaseException:
            self.discard()
            raise

    @contextlib.contextmanager
    def naming_destinations(self) -> Iterator[None]:
        """Inside this block an ``OSError`` about a temporary file is re-raised naming its destination."""
        try:
            yield
        except OSError as e:
            raise _renamed(e, {str(t): str(f) for t, f in zip(self.temps, self.finals, strict=True)}) from None

    def commit(self) -> None:
        """Sync every temporary file and rename them all into place (rolled back if a rename fails)."""
        if not self._open:
            return
        try:
            with self.naming_destinations():
                for tmp in self.temps:
                    # the writer may have replaced the file with one of its own
                    os.chmod(tmp, 0o600) if self.private else give_normal_modes(tmp)
                    fsync_file(tmp)
                _commit(self.temps, self.finals)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the temporary files (what was committed is no longer there to remove)."""
        self._open = False
        for tmp in self.temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicGroup:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _commit(temps: list[Path], finals: list[Path]) -> None:
    if len(finals) == 1:
        os.replace(temps[0], finals[0])
        fsync_dir(finals[0].parent)
        return
    backups: dict[Path, Path] = {}
    existed = {f for f in finals if f.exists()}
    done: list[Path] = []
    try:
        for final in existed:
            backup = temp_beside(final)
            backup.unlink()
            try:
                os.link(final, backup)
            except OSError:  # no hard links here: this one cannot be rolled back
                continue
            backups[final] = backup
        for tmp, final in zip(temps, finals, strict=True):
            os.replace(tmp, final)
            done.append(final)
    except BaseException:
        for final in reversed(done):  # put back what was there, or remove what was not
            with contextlib.suppress(OSError):
                if final in backups:
                    os.replace(backups.pop(final), final)
                elif final not in existed:
                    final.unlink()
        raise
    finally:
        for backup in backups.values():
            with contextlib.suppress(OSError):
                backup.unlink()
        for parent in {f.parent for f in finals}:
            fsync_dir(parent)
