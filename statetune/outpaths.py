"""Checks on the names of outputs, shared by every command that reads inputs and writes an output.

An output must be a file name: ``--out runs/`` or ``--out runs/.`` (a directory, or a name ending with a
path separator) is refused rather than turned into hidden files such as ``runs/.jsonl``. An output must
not be one of the command's inputs however it is spelled: ``./x``, ``a/../x``, a symbolic link to it, or a
hard link of it (the same file under another name) all count as the same file. An output that exists must be
a regular file: a FIFO, a device (``/dev/null``, ``/dev/stdout``) or a socket is refused, since every output
is written beside its destination and renamed onto it, which would replace the special file itself.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from statetune.errors import OptionError

#: ``(flag, path)`` pairs of a command's inputs; a path may be None (an optional input not given).
Inputs = Iterable[tuple[str, "str | Path | None"]]


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode when both exist (hard and symbolic links), else
    the same absolute path once ``.``, ``..`` and symbolic links are resolved."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(a).resolve() == Path(b).resolve()


def check_name(out: str | Path, flag: str) -> None:
    """Refuse an output name that ends with a path separator, or whose last part is ``.`` or ``..``: it names
    a directory, and the files written from it would have no name of their own."""
    text = os.fspath(out)
    seps = os.sep + (os.altsep or "")
    last = text.rstrip(seps).rsplit(os.sep, 1)[-1] if text.rstrip(seps) else ""
    if text.endswith(tuple(seps)) or last in ("", ".", ".."):
        example = os.path.join(text.rstrip(seps) or text, "NAME")
        raise OptionError(f"{flag}: {text!r} names a directory; give a file name, e.g. {example}")


def special_kind(path: str | Path) -> str | None:
    """What ``path`` is when it exists (through symbolic links) and is neither a regular file nor a directory:
    ``"a FIFO"``, ``"a character device"``, ...; None otherwise."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), None)


def special_message(out: str | Path) -> str | None:
    """Why ``out`` cannot be written (:func:`special_kind`), or None when it can."""
    kind = special_kind(out)
    if kind is None:
        return None
    return (f"{out} is {kind}, not a file: outputs are written beside their destination and renamed onto it, "
            "which would replace it; give a file name")


def check_output(out: str | Path, flag: str, inputs: Inputs = ()) -> None:
    """Usage errors for an output file ``out`` given by ``flag``: a directory name (:func:`check_name`, or an
    existing directory), a special file (:func:`special_kind`) and an output that is the same file as one of
    ``inputs``."""
    check_name(out, flag)
    if os.path.isdir(out):
        raise OptionError(f"{flag}: {out} is a directory; give a file name, e.g. {os.path.join(out, 'NAME')}")
    check_not_input(out, flag, inputs)
    message = special_message(out)
    if message:
        raise OptionError(f"{flag}: {message}")


def check_not_input(out: str | Path, flag: str, inputs: Inputs) -> None:
    """Refuse an output ``out`` that is the same file as one of ``inputs``: writing it would destroy it."""
    for in_flag, path in inputs:
        if path is not None and os.fspath(path) and same_file(out, path):
            what = "is" if os.fspath(path) == os.fspath(out) else f"is the same file as {path},"
            raise OptionError(f"{flag}: {out} {what} an input ({in_flag}); writing it would destroy the input: "
                              f"choose another output name")
