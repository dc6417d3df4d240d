"""User-facing errors: each says what was expected, what was found, and where.

Every error a user can cause derives from :class:`StatetuneError`; the CLI prints it as one line and exits
with its ``exit_code``: 2 for a usage error (a flag or option value), 1 for a runtime failure (a file that
cannot be read or written, a record that is malformed, a state that does not fit).
"""

USAGE = 2
RUNTIME = 1


class StatetuneError(Exception):
    """An error caused by user input (a file, a flag, a record); the CLI prints it without a traceback."""

    exit_code = RUNTIME


class CheckpointError(StatetuneError):
    """A model checkpoint that cannot be read or does not have the expected keys and shapes."""


class DataError(StatetuneError):
    """A dataset record that is malformed; the message names the file, line and field."""


class RecordError(DataError):
    """A record that does not fit its format; ``field`` says which part (the caller adds file and line)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"field {field!r}: {detail}")
        self.field = field
        self.detail = detail

    def __reduce__(self) -> tuple:
        """Rebuilt from both arguments: a reader's error travels to ``prepare``'s worker processes."""
        return type(self), (self.field, self.detail)

    @property
    def message(self) -> str:
        """The message without the field when the problem is the whole record (bad JSON, wrong columns)."""
        return self.detail if self.field == "record" else str(self)


class OptionError(StatetuneError):
    """A command-line or config option with an invalid value; the message names the flag."""

    exit_code = USAGE


class StateFileError(StatetuneError):
    """A state file that cannot be read or does not fit the model."""


class NonFiniteError(StatetuneError):
    """A model's output (its logits, or a loss) that is NaN or infinite.

    Found where the value is computed (the engine checks the logits of every step, the objective a dataset's
    loss) and raised before anything is written or emitted from it. ``source`` names the start state and its
    scale (:func:`state_source`): a state or a ``--state-scale`` too large for the model is the usual cause,
    a damaged model the other.
    """

    def __init__(self, what: str, detail: str, source: str | None = None) -> None:
        self.what, self.detail, self.source = what, detail, source
        origin = f", with {source}" if source else ""
        why = ("the model's weights drive it out of range; check the model" if source == ZERO_STATE else
               "the state, its scale or the model's weights drive the model out of range; try a smaller "
               "--state-scale, or check the state and the model")
        super().__init__(f"{what} is not finite ({detail}){origin}: {why}")


ZERO_STATE = "the zero state"


def state_source(path: str | None, scale: float = 1.0) -> str:
    """How a :class:`NonFiniteError` names a start state: the file (None: zeros) and the scale it is used at."""
    return ZERO_STATE if path is None else f"state {path} at --state-scale {scale:g}"


def check_finite(value, what: str, source: str | None = None, of: str = "values") -> None:
    """Raise :class:`NonFiniteError` unless ``value`` is finite: a float (a loss), or a tensor of ``of``
    (logits: one reduction and one device sync, nothing more); ``what`` names it (``"the loss"``)."""
    import math

    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise NonFiniteError(what, str(value), source)
    elif not bool(value.isfinite().all()):
        raise NonFiniteError(what, f"NaN or infinite {of}", source)


def explain(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code of an expected failure, or None for a bug in statetune.

    Expected are statetune's own errors and what the outside world does to a command: a path that cannot
    be written or read (permissions, a read-only file system, a parent that is a file, a full disk), and
    input that cannot be decoded (not UTF-8, invalid JSON or TOML, JSON nested too deep to parse).
    """
    import json
    import tomllib

    if isinstance(exc, StatetuneError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        return _os_message(exc), RUNTIME
    if isinstance(exc, UnicodeDecodeError):
        return f"input is not valid UTF-8 (byte {exc.object[exc.start:exc.start + 1]!r} at {exc.start})", RUNTIME
    if isinstance(exc, UnicodeEncodeError):
        return f"text that cannot be written as {exc.encoding} (character {exc.start}: {exc.reason})", RUNTIME
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", RUNTIME
    if isinstance(exc, tomllib.TOMLDecodeError):
        return f"invalid TOML: {exc}", RUNTIME
    if isinstance(exc, RecursionError):
        return "input nested too deeply to read", RUNTIME
    if isinstance(exc, MemoryError):
        return "out of memory", RUNTIME
    return None


def _os_message(exc: OSError) -> str:
    import errno
    import os

    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device (nothing was replaced)"
    elif exc.errno == errno.EROFS:
        reason = "read-only file system"
    where = [os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{' -> '.join(where)}: {reason}" if where else f"{reason}"
