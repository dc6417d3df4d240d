"""Reading one field of a record, and ``{field}`` templates: type checks with errors that name the field.

``RecordError`` (from :mod:`statetune.errors`, so that prompt building below ``data`` can raise it too)
carries the field; whoever reads the file adds the file name and line to the message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from statetune.errors import RecordError
from statetune.prompts import parse_template

# -- templates ---------------------------------------------------------------------------------------------

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    r"""Turn the two-character escapes ``\n``, ``\t``, ``\r`` and ``\\`` typed on a shell into characters."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


@dataclass(frozen=True)
class Template:
    """A ``{field}`` template (``{{``/``}}`` for literal braces), parsed once and checked for odd syntax."""

    source: str
    flag: str
    parts: tuple[tuple[str, str | None], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", parse_template(self.source, self.flag))

    @property
    def fields(self) -> list[str]:
        """The record fields the template reads, in order of first use."""
        return list(dict.fromkeys(name for _, name in self.parts if name is not None))

    def render(self, record: Mapping[str, Any], required: bool = False) -> str:
        """Fill the template from ``record``; with ``required``, an empty field value is an error."""
        out = []
        for literal, name in self.parts:
            out.append(literal)
            if name is not None:
                out.append(_scalar(record, name, self.flag, required))
        return "".join(out)


def _scalar(record: Mapping[str, Any], name: str, flag: str, required: bool) -> str:
    if name not in record:
        raise RecordError(name, f"missing (named in {flag}); the record has {field_names(record)}")
    value = record[name]
    if isinstance(value, str):
        check_text(name, value, allow_empty=not required)
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise RecordError(name, f"expected a string or a number, got {describe_type(value)}")


# -- field checks ------------------------------------------------------------------------------------------


def describe_type(value: Any) -> str:
    """A JSON-ish name for the type of ``value`` (for messages)."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def field_names(record: Mapping[str, Any]) -> str:
    """The fields a record has (for messages)."""
    return "fields " + ", ".join(map(repr, record)) if record else "no fields"


def check_text(name: str, value: str, allow_empty: bool = False) -> None:
    """Raise ``RecordError`` for empty text (unless allowed) or text that cannot be UTF-8."""
    if not value and not allow_empty:
        raise RecordError(name, "empty text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        detail = f"invalid UTF-8 (unpaired surrogate {value[e.start]!r} at character {e.start})"
        raise RecordError(name, detail) from None


def text_field(record: Mapping[str, Any], name: str, allow_empty: bool = False,
               optional: bool = False) -> str:
    """``record[name]`` as a string: present (unless ``optional``), a string, valid UTF-8, non-empty."""
    if name not in record:
        if optional:
            return ""
        raise RecordError(name, f"missing; the record has {field_names(record)}")
    value = record[name]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise RecordError(name, f"expected a string, got {describe_type(value)}")
    check_text(name, value, allow_empty)
    return value
