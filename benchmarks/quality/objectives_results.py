"""The results file of ``benchmarks/quality_objectives.py``: appended under a lock (two processes may run
at once), read back to skip finished runs, and printed as a Markdown table (mean ± sample std over seeds)."""

from __future__ import annotations

import fcntl
import json
import statistics
from contextlib import contextmanager
from pathlib import Path

from benchio import write_json

COLUMNS = (("test_loss", "test loss", 3), ("bleu", "BLEU", 1), ("chrf", "chrF", 1), ("ser", "SER", 3),
           ("distinct", "distinct", 2))


# -- the results file ----------------------------------------------------------------------------------------

@contextmanager
def locked(path: Path):
    """Hold an exclusive lock beside the results file while it is read, changed and written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".json.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"benchmark": "quality_objectives", "commands": [],
                                                                  "runs": [], "sweeps": []}


def update(path: Path, change) -> dict:
    """Read, ``change(results)`` and write the results file under the lock; returns what was written."""
    with locked(path):
        results = read(path)
        change(results)
        write_json(results, path, indent=1)
        return results


def find(results: dict, kind: str, **key) -> dict | None:
    return next((r for r in results[kind] if all(r.get(k) == v for k, v in key.items())), None)


def append(path: Path, kind: str, row: dict, **key) -> None:
    """Add ``row`` to ``results[kind]`` unless a row with ``key`` is already there (another process)."""
    update(path, lambda res: None if find(res, kind, **key) else res[kind].append({**key, **row}))


# -- the table -----------------------------------------------------------------------------------------------

def cell(vals: list[float], digits: int) -> str:
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def table(results: dict) -> str:
    """One Markdown row per method (mean ± sample std over seeds) in the order first recorded."""
    head = "| method | stages (steps x batch {b}) | LR | seeds | trainable | " + " | ".join(c[1] for c in COLUMNS)
    lines = [head.format(b=results.get("config", {}).get("batch_size", "?")) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(COLUMNS)]
    order = list(dict.fromkeys((r["method"], r.get("steps")) for r in results["runs"]))
    for m, steps in order:
        rows = [r for r in results["runs"] if (r["method"], r.get("steps")) == (m, steps)]
        lr = ", ".join(sorted({f"{r['lr']:g}" for r in rows if r.get("lr") is not None})) or "–"
        seeds = sum(r.get("seed") is not None for r in rows) or "–"
        stages = rows[0].get("stages", {"base": "none (zero state)", "reference": "human reference, first of each MR"}
                             .get(m, ""))
        cells = [cell([r[k] for r in rows if r.get(k) is not None], d) for k, _, d in COLUMNS]
        lines.append(f"| {m} | {stages} | {lr} | {seeds} | {rows[0].get('trainable', 0):,} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)
