"""How many connections the server may hold, from the process's open-file limit (``ulimit -n``).

Every connection is a file descriptor, and so is every file the server opens (state files, the model, log
files, the listening socket). When connections use them all, ``accept`` fails with EMFILE, asyncio logs a
traceback for each attempt, and nothing (``/health`` included) can be served. So connections are capped
well below the limit: a quarter of it (at least :data:`MIN_RESERVE`) stays free for files and for the
connections accepted in one burst before any can be closed, a burst the listen backlog bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from statetune.errors import OptionError

MIN_RESERVE = 64  # descriptors never given to connections
MAX_AUTO = 4096  # the default cap when the open-file limit is very high
MAX_BACKLOG = 2048


def open_file_limit() -> int | None:
    """The soft ``RLIMIT_NOFILE`` of this process (None where the platform has none, or it is unlimited)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def reserve(limit: int) -> int:
    """Descriptors kept from connections under an open-file limit of ``limit``."""
    return max(MIN_RESERVE, limit // 4)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client can hold: ``max_connections`` open at once, ``header_timeout`` seconds to send a
    request's headers, ``keep_alive`` seconds idle between requests; ``backlog`` is the listen queue (and
    the most connections accepted in one burst)."""

    max_connections: int
    header_timeout: float = 10.0
    keep_alive: float = 5.0
    backlog: int = 128


def connection_limits(requested: int | None, header_timeout: float = 10.0, keep_alive: float = 5.0,
                      limit: int | None = None) -> ConnectionLimits:
    """The limits for ``--max-connections requested`` (None: derived from the open-file limit ``limit``,
    default this process's); a request that would leave fewer than the reserve free is an
    :class:`~statetune.errors.OptionError` naming the flag."""
    limit = open_file_limit() if limit is None else limit
    if limit is None:
        cap = requested or MAX_AUTO
        return ConnectionLimits(cap, header_timeout, keep_alive, min(MAX_BACKLOG, cap))
    most = limit - reserve(limit)
    if most < 1:
        raise OptionError(f"--max-connections: the open-file limit ({limit}, ulimit -n) is too low to serve; "
                          f"raise it to at least {MIN_RESERVE * 2}")
    if requested is not None and requested > most:
        raise OptionError(f"--max-connections: {requested} would leave too few files for the server under the "
                          f"open-file limit of {limit} (ulimit -n); give at most {most}, or raise the limit")
    cap = requested if requested is not None else min(MAX_AUTO, most)
    backlog = max(16, min(MAX_BACKLOG, (limit - cap) // 2))
    return ConnectionLimits(cap, header_timeout, keep_alive, backlog)
