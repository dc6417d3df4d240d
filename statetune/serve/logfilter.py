"""Repeated warnings and errors, once per interval: a flood of bad connections must not flood the log.

A client can make the server log as fast as it can connect (a refused connection, an invalid request, an
``accept`` failing for want of file descriptors, which asyncio reports with a traceback each time). The
:class:`RepeatFilter` lets the first record of each kind through, drops the repeats for ``interval``
seconds, and adds to the next one let through how many were dropped. A kind is the logger, the level, the
message template and the exception type, not the values, so "closed 3 connections" and "closed 4" are the
same kind. Records below WARNING (the access log, start-up) always pass.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

# the loggers a client can make write: the server's own, uvicorn's, and asyncio's (accept failures)
LOGGERS = ("statetune.serve", "uvicorn.error", "asyncio")


class RepeatFilter(logging.Filter):
    """Let through one warning-or-worse record per kind per ``interval`` seconds, with a count of the rest."""

    def __init__(self, interval: float = 10.0, clock=time.monotonic) -> None:
        super().__init__()
        self.interval, self.clock = interval, clock
        self._seen: dict[tuple, list[float | int]] = {}  # kind -> [time let through, repeats dropped since]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        kind = (record.name, record.levelno, str(record.msg), exc)
        now = self.clock()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is not None and now - seen[0] < self.interval:
                seen[1] += 1
                return False
            dropped = seen[1] if seen is not None else 0
            self._seen[kind] = [now, 0]
            if len(self._seen) > 1000:  # a bound on the kinds remembered; the oldest go first
                for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:500]:
                    del self._seen[old]
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like this in the last {self.interval:g}s not shown)"
        return True


@contextlib.contextmanager
def quiet_repeats(interval: float = 10.0, loggers: tuple[str, ...] = LOGGERS) -> Iterator[RepeatFilter]:
    """A :class:`RepeatFilter` on ``loggers`` for the duration of the block."""
    filt = RepeatFilter(interval)
    targets = [logging.getLogger(name) for name in loggers]
    for target in targets:
        target.addFilter(filt)
    try:
        yield filt
    finally:
        for target in targets:
            target.removeFilter(filt)
