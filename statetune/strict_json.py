"""The one JSON parser for data users hand to statetune: standard JSON only, nothing silently dropped.

Python's ``json`` accepts ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON), turns a number too large for a
float (``1e999``) into infinity, and keeps the last of two equal keys in an object without a word. In a
dataset, a prompt's metadata or a record to generate for, each of these is a mistake that would surface
later as the text ``nan``, a non-finite value or a field that quietly changed, so :func:`loads` refuses
them with a :class:`StrictJSONError` that says what and where (the caller adds the file and line).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

__all__ = ["StrictJSONError", "loads"]


class StrictJSONError(ValueError):
    """Text that is not standard JSON, or holds a non-finite number or a repeated key; ``msg`` says which."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


def _constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON number (write a finite number, or null)")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"the number {text[:40]} is too large for a float")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJSONError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def loads(text: str | bytes) -> Any:
    """Parse standard JSON; :class:`StrictJSONError` for ``NaN``/``Infinity``, numbers beyond a float's range
    or too long to read, repeated keys, bytes that are not UTF-8, nesting too deep for the parser and invalid
    JSON (with the position, as ``json`` gives it)."""
    try:
        return json.loads(text, parse_constant=_constant, parse_float=_float, object_pairs_hook=_object)
    except StrictJSONError:
        raise
    except UnicodeDecodeError as e:
        raise StrictJSONError(f"invalid UTF-8 at byte {e.start}") from None
    except RecursionError:
        raise StrictJSONError("JSON nested too deeply to read") from None
    except json.JSONDecodeError as e:
        raise StrictJSONError(f"invalid JSON: {e.msg.removesuffix(' at')} at column {e.colno}"
                              + (f" of line {e.lineno}" if e.lineno > 1 else "")) from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise StrictJSONError(f"a number with more than {sys.get_int_max_str_digits()} digits") from None
