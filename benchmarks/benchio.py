"""What every benchmark script does with its numbers: print them as a table and save them as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path


def print_rows(rows: list[tuple[str, str]]) -> None:
    """A two-column table: labels padded to the longest, then values."""
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def write_json(obj: object, path: str | Path, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically (a run stopped midway leaves the last complete file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
