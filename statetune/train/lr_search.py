"""``train --lr auto``: the learning-rate search a run makes before it trains, on its own model and data.

Every trial starts a fresh copy of the run's starting state (same initial state, same encoder seed) and
takes ``--lr-search-steps`` optimizer steps, through the very step training uses (:mod:`statetune.train.step`),
on the first global batches of the run's own data order, with a short warmup and cosine decay. It is scored
on the validation data (at most ``--val-batches``, default 16 batches) or, without ``--val-data``, on the
last few training batches of that order, which the trials never train on. :func:`~statetune.train.lr_finder.
find_lr` then picks the rate (decade grid, then the midpoints around the best). The search costs about
``(len(--lr-search-rates) + 2) * --lr-search-steps`` steps.
"""

from __future__ import annotations

import logging
import math

import torch

from statetune.data.loader import global_batches
from statetune.errors import OptionError
from statetune.model.state import RWKVState
from statetune.objectives import Segmenting, SFTObjective, TrainObjective
from statetune.train import guard
from statetune.train.config import TrainConfig
from statetune.train.distributed import Dist
from statetune.train.lr_finder import LRSearch, Trial, TrialResult, find_lr
from statetune.train.schedule import lr_at
from statetune.train.step import take_step
from statetune.tuning.tunable import TunableState

log = logging.getLogger("statetune.train")
#: Validation batches a trial is scored on unless --val-batches says otherwise.
SCORE_BATCHES = 16
#: Training batches held out for scoring when there is no validation data.
HELD_OUT_BATCHES = 4


def search_lr(model, train, val, start: RWKVState, config: TrainConfig, d: Dist,
              objective: TrainObjective | None = None) -> LRSearch:
    """Run the search described in the module docstring and return its pick and log (nothing is changed)."""

    def report(t: TrialResult) -> None:
        if d.main:
            log.info("lr search: lr %g -> held-out loss %s (%.1fs)", t.lr,
                     "diverged" if t.diverged else f"{t.loss:.4f}", t.seconds)

    rng = torch.get_rng_state()
    try:
        trial = make_trial(model, train, val, start, config, d, objective)
        search = find_lr(trial, rates=config.optim.lr_search_rates, steps=config.optim.lr_search_steps,
                         on_trial=report)
    finally:
        torch.set_rng_state(rng)  # the run itself starts exactly as it would have with a fixed rate
    search.rule += ", scored on " + ("validation" if val is not None else "held-out training batches")
    if d.main:
        log.info("lr search: picked lr %g (held-out loss %.4f)", search.lr, search.best_loss)
    return search


def make_trial(model, train, val, start: RWKVState, config: TrainConfig, d: Dist,
               objective: TrainObjective | None = None) -> Trial:
    """``trial(lr, steps) -> held-out loss`` for this run, as the module docstring describes, through the
    run's ``objective`` (default: the masked next-token loss) and scored by its loss."""
    if objective is None:
        objective = SFTObjective(model, Segmenting(config.ctx_len, config.bptt, config.activation_checkpoint))
    o = config.optim
    batches = global_batches(train.lengths, config.batch_size * config.grad_accum * d.world, config.seed, 0)
    if val is not None:
        def score(state: RWKVState) -> float:
            return objective.evaluate(val, state, config.batch_size, config.eval.val_batches or SCORE_BATCHES).loss
    else:
        n_held = min(HELD_OUT_BATCHES, len(batches) // 5)
        if n_held < 1:
            raise OptionError(f"--lr auto: without --val-data the search scores on held-out training batches, "
                              f"but {train.path} has only {len(batches)} batch(es) of {len(batches[0])}; give "
                              f"--val-data or a learning rate")
        held = [i for b in batches[-n_held:] for i in b]
        batches = batches[:-n_held]

        def score(state: RWKVState) -> float:
            return objective.evaluate(train, state, config.batch_size, indices=held).loss

    def trial(lr: float, n_steps: int) -> float:
        tunable = TunableState(start, config.tuning, config.seed).to(model.device)
        groups = tunable.param_groups()
        params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        warmup = max(1, n_steps // 6)
        for i in range(n_steps):
            peak_here = lr_at(i, n_steps, lr, min(config.schedule.lr_final, lr), warmup)
            stats = take_step(objective, train, batches[i % len(batches)], tunable, optimizer, params, config, d,
                              peak_here)
            if not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])):
                raise FloatingPointError
        with torch.no_grad():
            state = tunable().detach()
        if not guard.state_is_finite(state):
            raise FloatingPointError
        return score(state)

    return trial
