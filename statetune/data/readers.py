"""Reading dataset files one record at a time: JSONL lines and CSV/TSV rows, with their line numbers.

Readers stream (memory stays bounded whatever the file size) and never stop at a bad record: a record they
cannot read comes out as a ``RecordError`` in its place, so ``--skip-invalid`` can skip it and go on. JSONL
lines come out as raw bytes, parsed later (possibly in a worker process) by ``parse_json_line``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from statetune import strict_json
from statetune.data.fields import RecordError
from statetune.errors import DataError

#: One record as read: (line number, raw JSONL bytes | CSV row | the reason it could not be read, bytes read).
Item = tuple[int, bytes | dict[str, str] | RecordError, int]

_BOM = b"\xef\xbb\xbf"
#: The longest record read (a JSONL line, a CSV field): one record becomes tens of times its size in memory
#: as token ids, so a larger one would make memory depend on the data, not on ``prepare``'s chunking.
MAX_RECORD_BYTES = 16 << 20


def file_kind(path: Path) -> str:
    """``"csv"``, ``"tsv"`` or ``"jsonl"`` (anything else is read as JSON Lines)."""
    suffix = path.suffix.lower()
    return suffix[1:] if suffix in (".csv", ".tsv") else "jsonl"


def read_items(path: Path) -> Iterator[Item]:
    """The records of a JSONL, CSV or TSV file, in order; blank lines are not records."""
    kind = file_kind(path)
    return read_jsonl(path) if kind == "jsonl" else read_csv(path, delimiter="\t" if kind == "tsv" else ",")


def read_jsonl(path: Path) -> Iterator[Item]:
    """Non-blank lines of a JSON Lines file as raw bytes (a UTF-8 byte-order mark is dropped). A line longer
    than :data:`MAX_RECORD_BYTES` is not kept in memory: it comes out as a ``RecordError``."""
    with path.open("rb") as fh:
        line_no = 0
        while raw := fh.readline(MAX_RECORD_BYTES + 1):
            line_no += 1
            if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                nbytes = len(raw) + _skip_line(fh)
                yield line_no, RecordError("record", f"a line of {nbytes / 2**20:,.0f} MiB; a record is at most "
                                           f"{MAX_RECORD_BYTES >> 20} MiB (split longer texts into several "
                                           "records)"), nbytes
                continue
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if raw.strip():
                yield line_no, raw, len(raw)


def _skip_line(fh: Any) -> int:
    """Read past the rest of the current line, a block at a time; the bytes skipped."""
    skipped = 0
    while block := fh.readline(1 << 20):
        skipped += len(block)
        if block.endswith(b"\n"):
            break
    return skipped


def parse_json_line(raw: bytes) -> dict[str, Any]:
    """One JSONL line as an object; raises ``RecordError`` for invalid UTF-8, invalid JSON, a non-object, and
    what Python's ``json`` would let through: ``NaN``/``Infinity``, overflowing numbers, repeated keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError("record", f"invalid UTF-8 at byte {e.start} of the line") from None
    try:
        value = strict_json.loads(text)
    except strict_json.StrictJSONError as e:
        hint = " (a JSON array? expected one JSON object per line)" if text.lstrip().startswith("[") else ""
        raise RecordError("record", f"{e.msg}{hint}") from None
    if not isinstance(value, dict):
        raise RecordError("record", f"expected a JSON object, got {type(value).__name__}")
    return value


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
    csv.field_size_limit(MAX_RECORD_BYTES)
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
                if "field limit" in str(e):
                    raise DataError(f"{path}:{start}: a field longer than {MAX_RECORD_BYTES >> 20} MiB (split longer "
                                    "texts into several records)") from None
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
