"""User-facing errors: each says what was expected, what was found, and where."""


class StatetuneError(Exception):
    """An error caused by user input (a file, a flag, a record); the CLI prints it without a traceback."""


class CheckpointError(StatetuneError):
    """A model checkpoint that cannot be read or does not have the expected keys and shapes."""


class DataError(StatetuneError):
    """A dataset record that is malformed; the message names the file, line and field."""


class OptionError(StatetuneError):
    """A command-line or config option with an invalid value; the message names the flag."""


class StateFileError(StatetuneError):
    """A state file that cannot be read or does not fit the model."""
