"""Reading dataset files one record at a time: JSONL lines and CSV/TSV rows, with their line numbers.

Readers stream (memory stays bounded whatever the file size) and never stop at a bad record: a record they
cannot read comes out as a ``RecordError`` in its place, so ``--skip-invalid`` can skip it and go on. JSONL
lines come out as raw bytes, parsed later (possibly in a worker process) by ``parse_json_line``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from statetune.data.fields import RecordError
from statetune.errors import DataError

#: One record as read: (line number, raw JSONL bytes | CSV row | the reason it could not be read, bytes read).
Item = tuple[int, bytes | dict[str, str] | RecordError, int]

_BOM = b"\xef\xbb\xbf"


def file_kind(path: Path) -> str:
    """``"csv"``, ``"tsv"`` or ``"jsonl"`` (anything else is read as JSON Lines)."""
    suffix = path.suffix.lower()
    return suffix[1:] if suffix in (".csv", ".tsv") else "jsonl"


def read_items(path: Path) -> Iterator[Item]:
    """The records of a JSONL, CSV or TSV file, in order; blank lines are not records."""
    kind = file_kind(path)
    return read_jsonl(path) if kind == "jsonl" else read_csv(path, delimiter="\t" if kind == "tsv" else ",")


def read_jsonl(path: Path) -> Iterator[Item]:
    """Non-blank lines of a JSON Lines file as raw bytes (a UTF-8 byte-order mark is dropped)."""
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if raw.strip():
                yield line_no, raw, len(raw)


def parse_json_line(raw: bytes) -> dict[str, Any]:
    """One JSONL line as an object; raises ``RecordError`` for invalid UTF-8, invalid JSON, a non-object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError("record", f"invalid UTF-8 at byte {e.start} of the line") from None
    try:
        value = json.loads(text, parse_constant=_not_json)
    except RecursionError:
        raise RecordError("record", "JSON nested too deeply to read") from None
    except json.JSONDecodeError as e:
        hint = " (a JSON array? expected one JSON object per line)" if text.lstrip().startswith("[") else ""
        raise RecordError("record", f"invalid JSON: {e.msg} at column {e.colno}{hint}") from None
    if not isinstance(value, dict):
        raise RecordError("record", f"expected a JSON object, got {type(value).__name__}")
    return value


def _not_json(name: str) -> None:
    """``NaN`` and ``Infinity`` are not JSON (Python's reader takes them; no writer here would write them)."""
    raise RecordError("record", f"invalid JSON: {name} is not a JSON value (write null or a number)")


class _LineFeed:
    """Decoded lines of a binary file for ``csv.reader``, counting the bytes handed out."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.bytes_read = 0
        self._first = True

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        raw = next(self._fh)
        self.bytes_read += len(raw)
        if self._first:
            self._first = False
            if raw.startswith(_BOM):
                raw = raw[len(_BOM):]
        # Invalid bytes become lone surrogates, reported as invalid UTF-8 only if the field is used.
        return raw.decode("utf-8", errors="surrogateescape")


def read_csv(path: Path, delimiter: str = ",") -> Iterator[Item]:
    """Rows of a CSV/TSV file with a header row, as ``{column: value}`` (quoted fields may span lines)."""
    csv.field_size_limit(2**31 - 1)
    with path.open("rb") as fh:
        feed = _LineFeed(fh)
        reader = csv.reader(feed, delimiter=delimiter, strict=True)  # strict: an unclosed quote is an error
        header: list[str] | None = None
        seen = 0
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                if "end of data" in str(e):
                    raise DataError(f"{path}:{start}: a quoted field opened in the record starting on this line "
                                    "is never closed (unterminated '\"')") from None
                raise DataError(f"{path}:{start}: unreadable CSV ({e}); cannot continue past it") from None
            nbytes, seen = feed.bytes_read - seen, feed.bytes_read
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                _check_header(path, start, header)
                continue
            if len(row) != len(header):
                error = RecordError("record", f"has {len(row)} columns, the header has {len(header)}")
                yield start, error, nbytes
                continue
            yield start, dict(zip(header, row, strict=True)), nbytes


def _check_header(path: Path, line: int, header: list[str]) -> None:
    if any(not name for name in header):
        raise DataError(f"{path}:{line}: the header row has an empty column name: {header}")
    dupes = sorted({name for name in header if header.count(name) > 1})
    if dupes:
        raise DataError(f"{path}:{line}: the header row repeats column(s) {', '.join(dupes)}")
