"""A short learning-rate search before training (``--lr auto``): a few dozen steps at each of a handful of
log-spaced rates, every trial from the same start, scored on held-out batches; the best one wins.

Why a search: the best rate for a state moves by 10x between budgets and model sizes, and a rate that is
off by a decade costs more than any other setting. Why this shape: unlike the exponential LR range test
(one run whose rate grows every step, read off a loss-vs-rate plot), every trial here runs the schedule a
real run would, so its held-out loss is the quantity the user cares about and the pick needs no reading.

The rule, in full:

1. Try ``rates`` (default: one per decade from ``low`` to ``high``), each for ``steps`` steps from the same
   start, through ``trial(lr, steps) -> held-out loss``. A trial that raises ``FloatingPointError`` or
   returns a non-finite loss counts as diverged (loss ``inf``).
2. With ``refine``, also try the geometric midpoints between the best rate and its neighbours in the list
   (half a decade either side with the default rates), so the pick is good to a factor of about 3.
3. Pick the rate with the lowest held-out loss; ties go to the smaller rate (the safer one for a longer run).
4. If every trial diverged, raise :class:`LRSearchError`: no rate can be recommended.

The driver owns what a trial means (which parameters, data and schedule): ``statetune train`` trains a copy
of the starting state on the first batches of the training data and scores validation (or held-out training)
batches; the quality benchmark calls its own method functions. Short searches favour larger rates than a
long run's best (a long run can afford to go slowly); ``shrink`` divides the pick by a factor for that, and
is 1 (off) unless evidence says otherwise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from statetune.errors import OptionError

Trial = Callable[[float, int], float]


class LRSearchError(OptionError, ValueError):
    """No learning rate could be picked (bad search settings, or every trial diverged)."""


@dataclass
class TrialResult:
    """One tried rate: its held-out loss (``inf`` if it diverged) and how long the trial took."""

    lr: float
    loss: float
    seconds: float
    diverged: bool = False


@dataclass
class LRSearch:
    """The outcome of :func:`find_lr`: the picked rate and every trial in the order they ran."""

    lr: float
    best_loss: float
    trials: list[TrialResult] = field(default_factory=list)
    steps: int = 0
    rule: str = ""

    def log(self) -> list[dict]:
        """The trials as plain dicts (for a run's config, a state's metadata or a JSON report)."""
        return [{"lr": t.lr, "loss": t.loss if math.isfinite(t.loss) else None, "seconds": t.seconds,
                 "diverged": t.diverged} for t in self.trials]

    def as_dict(self) -> dict:
        return {"lr": self.lr, "best_loss": self.best_loss, "steps": self.steps, "rule": self.rule,
                "trials": self.log()}


def log_rates(low: float, high: float, per_decade: int = 1) -> list[float]:
    """Rates from ``low`` to ``high`` (both included), ``per_decade`` of them per factor of 10, log-spaced."""
    if not (0 < low <= high) or not math.isfinite(high):
        raise LRSearchError(f"learning-rate range: need 0 < low <= high, got {low!r}..{high!r}")
    if per_decade < 1:
        raise LRSearchError(f"rates per decade: need at least 1, got {per_decade!r}")
    n = max(1, round(math.log10(high / low) * per_decade))
    return [float(f"{low * (high / low) ** (i / n):.6g}") for i in range(n + 1)] if n > 0 else [low]


def _run(trial: Trial, lr: float, steps: int) -> TrialResult:
    t0 = time.perf_counter()
    try:
        loss = float(trial(lr, steps))
    except FloatingPointError:
        loss = math.inf
    diverged = not math.isfinite(loss)
    return TrialResult(lr, math.inf if diverged else loss, time.perf_counter() - t0, diverged)


def find_lr(trial: Trial, *, rates: Sequence[float] | None = None, low: float = 0.1, high: float = 100.0,
            steps: int = 24, refine: bool = True, shrink: float = 1.0,
            on_trial: Callable[[TrialResult], None] | None = None) -> LRSearch:
    """Search learning rates by the rule in the module docstring and return the pick with its log.

    ``trial(lr, steps)`` must train ``steps`` optimizer steps at peak rate ``lr`` from the same starting
    point every time and return the held-out loss. ``rates`` overrides the ``low``..``high`` decades;
    ``on_trial`` is called after each trial (for logging progress).
    """
    if steps < 1:
        raise LRSearchError(f"search steps: need at least 1, got {steps!r}")
    if not shrink > 0:
        raise LRSearchError(f"shrink: need a positive factor, got {shrink!r}")
    grid = sorted(set(rates)) if rates is not None else log_rates(low, high)
    if not grid or any(not (r > 0 and math.isfinite(r)) for r in grid):
        raise LRSearchError(f"rates: need positive finite learning rates, got {list(rates or [])!r}")
    done: list[TrialResult] = []

    def run(lr: float) -> None:
        result = _run(trial, lr, steps)
        done.append(result)
        if on_trial is not None:
            on_trial(result)

    for lr in grid:
        run(lr)
    if refine and len(grid) > 1:
        best = min(done, key=lambda t: (t.loss, t.lr))
        i = grid.index(best.lr)
        for j in (i - 1, i + 1):
            if 0 <= j < len(grid) and math.isfinite(best.loss):
                run(float(f"{math.sqrt(grid[i] * grid[j]):.6g}"))
    best = min(done, key=lambda t: (t.loss, t.lr))
    if not math.isfinite(best.loss):
        raise LRSearchError(f"every learning rate tried diverged ({', '.join(f'{t.lr:g}' for t in done)}); "
                            "try lower rates")
    rule = (f"lowest held-out loss after {steps} steps over {len(done)} rates"
            + (" (decade grid, then the half-decade midpoints around the best)" if refine and len(grid) > 1 else "")
            + (f", divided by {shrink:g}" if shrink != 1 else ""))
    return LRSearch(lr=best.lr / shrink, best_loss=best.loss, trials=done, steps=steps, rule=rule)
