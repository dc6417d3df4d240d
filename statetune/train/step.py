"""One optimizer step of state tuning: the objective's loss of a global batch, the optional L2 pull toward the
initial state, gradient clipping and AdamW. Training runs it every step; ``--lr auto``'s trials run it too,
so a trial learns exactly as the run it stands in for would."""

from __future__ import annotations

import math

import torch

from statetune.data.loader import micro_batches
from statetune.objectives import TrainObjective
from statetune.train.config import TrainConfig
from statetune.train.distributed import Dist
from statetune.tuning.tunable import TunableState


def _global(d: Dist, values: dict[str, float]) -> dict[str, float]:
    """``values`` summed over the processes (one all-reduce; keys in sorted order on every rank)."""
    keys = sorted(values)
    summed = d.all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) for k, v in zip(keys, summed.tolist(), strict=True)}


def take_step(objective: TrainObjective, data, batch: list[int], tunable: TunableState,
              optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], config: TrainConfig, d: Dist,
              lr: float) -> dict:
    """Train ``tunable`` on the global batch ``batch`` (dataset indices) at rate ``lr``; returns the
    objective's statistics of the step (``loss`` first: for sft the mean per loss token), ``grad_norm``
    (before clipping), ``tokens``, and ``state_l2`` (the penalty term) when ``--state-l2`` is on.

    The loss is divided by the global batch's counts (loss tokens, pairs), so micro-batches and ranks
    average it. The penalty ``state_l2 * sum((state - initial)^2)`` is added once per step, whatever the
    number of ranks.
    """
    groups = micro_batches(batch, data.lengths, config.batch_size, d.world, d.rank)
    examples = [[data[i] for i in g] for g in groups]
    totals = _global(d, objective.normalisers(examples))
    optimizer.zero_grad(set_to_none=True)
    sums = objective.backward(examples, tunable, totals)
    l2 = config.optim.state_l2
    penalty = None
    if l2 > 0:
        penalty = tunable.distance_sq() * l2
        (penalty / d.world).backward()  # the all-reduce below sums the ranks' shares back to one penalty
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        d.all_reduce_sum(p.grad)
    clip = config.optim.grad_clip
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # checkpoints from before lr_scale have one group
    optimizer.step()
    sums = _global(d, sums)
    stats = {**objective.summary(sums, totals), "grad_norm": grad_norm, "tokens": int(sums["tokens"])}
    if penalty is not None:
        stats["state_l2"] = float(penalty.detach())
    return stats
