"""What every benchmark script does with its numbers: print them as a table and save them as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from statetune.fileio import atomic_write

REPO = Path(__file__).resolve().parents[1]


def print_rows(rows: list[tuple[str, str]]) -> None:
    """A two-column table: labels padded to the longest, then values."""
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def write_json(obj: object, path: str | Path, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically (a run stopped midway leaves the last complete file)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def output_paths(results_dir: Path, stem: str, quick: bool, report: Path | None) -> tuple[Path, Path]:
    """The results JSON and the report of a run: a full run into ``benchmarks/results`` reports into
    ``benchmarks/RESULTS.md``; a ``--quick`` run or one into another folder writes ``STEM.md`` beside its JSON
    (so a smoke run never rewrites the recorded report)."""
    stem = f"{stem}_quick" if quick else stem
    official = not quick and results_dir.resolve() == (REPO / "benchmarks/results").resolve()
    return results_dir / f"{stem}.json", report or (REPO / "benchmarks/RESULTS.md" if official
                                                    else results_dir / f"{stem}.md")
