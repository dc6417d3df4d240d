"""The learning-curve results file: points keyed by (method, budget, LR, seed, source), merged across invocations.

Several invocations (``--methods`` slices, one budget at a time, more seeds later) write into ONE JSON file.
Each save takes a lock, reads what is on disk, puts this invocation's points over it (a point run again
replaces the old one), and writes the whole file atomically, so a stopped run leaves the last complete file
and two invocations running side by side do not lose each other's points. A file made with another setup
(model, data, split sizes, prompts) is refused rather than mixed in.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path

from benchio import write_json

from statetune.locking import waiting

from . import report

#: Fields of a point that say which run it is; everything else is what the run measured. ``source`` is
#: "sweep" or "finder": the LR finder's run at a rate the sweep also tried is another run (its schedule
#: comes from ``train --lr auto``), so it sits beside the sweep's point instead of replacing it.
KEY = ("method", "budget", "lr", "seed", "source")
#: Per-point numbers summarised as mean ± std over the seeds at a (method, budget)'s chosen LR.
NUMERIC = ("trainable", "stored_bytes", "train_s", "best_val", "test_loss", "bleu", "chrf", "rouge_l",
           "exact_match", "general_loss")


class SetupMismatch(SystemExit):
    """The results file on disk was made with another setup; merging would mix incomparable numbers."""


def key(point: dict) -> tuple:
    return tuple(point.get(k, "sweep") if k == "source" else point[k] for k in KEY)


def is_sweep(point: dict) -> bool:
    """A point of the sweep or of a further seed (not one the LR finder trained)."""
    return point.get("source", "sweep") != "finder"


def empty(setup: dict) -> dict:
    return {"benchmark": "quality_curves", "setup": setup, "baselines": {}, "points": [], "finder": [],
            "invocations": []}


def read(path: Path, setup: dict | None = None) -> dict:
    """The results at ``path`` (an empty file's worth if missing); with ``setup``, refuse a different one."""
    if not path.exists():
        return empty(setup or {})
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not a results JSON ({e.msg} at line {e.lineno})") from None
    if data.get("benchmark") != "quality_curves":
        raise SystemExit(f"{path}: not a learning-curve results file (benchmark is {data.get('benchmark')!r})")
    if setup is not None and data.get("setup") != setup:
        diff = sorted(k for k in set(setup) | set(data.get("setup", {}))
                      if setup.get(k) != data.get("setup", {}).get(k))
        raise SetupMismatch(f"{path}: made with another setup (differs in {', '.join(diff)}); "
                            "pass another --results-dir or the same options")
    return data


def merge(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s points, finder searches, baselines and invocation record on top."""
    out = dict(old)
    points = {key(p): p for p in old.get("points", [])}
    points.update({key(p): p for p in new.get("points", [])})
    out["points"] = sorted(points.values(), key=key)
    finder = {(f["method"], f["budget"]): f for f in old.get("finder", [])}
    finder.update({(f["method"], f["budget"]): f for f in new.get("finder", [])})
    out["finder"] = sorted(finder.values(), key=lambda f: (f["method"], f["budget"]))
    out["baselines"] = {**old.get("baselines", {}), **new.get("baselines", {})}
    inv = {i["id"]: i for i in old.get("invocations", [])}
    inv.update({i["id"]: i for i in new.get("invocations", [])})
    out["invocations"] = sorted(inv.values(), key=lambda i: i["date"])
    for k in ("setup", "model", "data", "machine", "config"):
        if k in new:
            out[k] = new[k]
    return out


def locked(path: Path) -> AbstractContextManager[None]:
    """An exclusive lock on ``path``'s sibling ``.lock`` file for one read-merge-write (statetune's own lock,
    waiting its turn; the lock file is removed after each save)."""
    return waiting(path.with_suffix(".lock"))


def save(path: Path, mine: dict) -> dict:
    """Merge this invocation's results into the file at ``path`` and write it atomically; the merged whole."""
    with locked(path):
        merged = merge(read(path, mine["setup"]), mine)
        write_json(merged, path, indent=1)
    return merged


# -- reading the merged results ----------------------------------------------------------------------------

def at_method(results: dict, method: str) -> list[dict]:
    return [p for p in results.get("points", []) if p["method"] == method]


def at(results: dict, method: str, budget: int) -> list[dict]:
    return [p for p in results.get("points", []) if p["method"] == method and p["budget"] == budget]


def sweep_runs(results: dict, method: str, budget: int) -> list[dict]:
    """The sweep's seed-0 runs at this budget, one per tried rate (the LR finder's runs left out)."""
    return [p for p in at(results, method, budget) if p["seed"] == 0 and is_sweep(p)]


def chosen_lr(results: dict, method: str, budget: int) -> float | None:
    """The LR whose seed-0 sweep run reached the lowest validation loss at this budget (None before any run);
    a rate only the LR finder tried does not count (the finder is compared against the sweep)."""
    sweep = sweep_runs(results, method, budget)
    return min(sweep, key=lambda p: p["best_val"])["lr"] if sweep else None


def curve_rows(results: dict) -> list[dict]:
    """One row per (method, budget): the chosen LR, the scored seeds there and their summary."""
    from .methods import order

    rows = []
    pairs = {(p["method"], p["budget"]) for p in results.get("points", [])}
    for method, budget in sorted(pairs, key=lambda mb: (order(mb[0]), mb[1])):
        lr = chosen_lr(results, method, budget)
        if lr is None:  # only the LR finder ran here: shown in the finder's table
            continue
        runs = [p for p in at(results, method, budget) if p["lr"] == lr and p.get("scored") and is_sweep(p)]
        lrs = sorted({p["lr"] for p in sweep_runs(results, method, budget)})
        rows.append({"method": method, "budget": budget, "lr": lr, "swept": lrs, "seeds": len(runs),
                     "summary": report.summarise(runs, NUMERIC)})
    return rows
