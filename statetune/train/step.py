"""One optimizer step of state tuning: the masked loss of a global batch, the optional L2 pull toward the
initial state, gradient clipping and AdamW. Training runs it every step; ``--lr auto``'s trials run it too,
so a trial learns exactly as the run it stands in for would."""

from __future__ import annotations

import math

import torch

from statetune.data.loader import TokenDataset, collate, micro_batches
from statetune.objective import backward_sequence
from statetune.train.config import TrainConfig
from statetune.train.distributed import Dist
from statetune.tuning.tunable import TunableState


def take_step(model, data: TokenDataset, batch: list[int], tunable: TunableState, optimizer: torch.optim.Optimizer,
              params: list[torch.nn.Parameter], config: TrainConfig, d: Dist, lr: float) -> dict:
    """Train ``tunable`` on the global batch ``batch`` (dataset indices) at rate ``lr``; returns the step's
    ``loss`` (mean per loss token), ``grad_norm`` (before clipping), ``loss_tokens`` and ``tokens``, and
    ``state_l2`` (the penalty term) when ``--state-l2`` is on.

    The loss is scaled by the global batch's loss-token count, so micro-batches and ranks average it. The
    penalty ``state_l2 * sum((state - initial)^2)`` is added once per step, whatever the number of ranks.
    """
    groups = micro_batches(batch, data.lengths, config.batch_size, d.world, d.rank)
    examples = [[data[i] for i in g] for g in groups]
    count = torch.tensor([float(sum(sum(e.mask[1:]) for g in examples for e in g))])
    total_count = max(1.0, float(d.all_reduce_sum(count)))
    optimizer.zero_grad(set_to_none=True)
    loss_sum, n_tokens = 0.0, 0
    for group in examples:
        tokens, mask = collate(group, model.device)
        n_tokens += int(tokens.numel())
        loss, _ = backward_sequence(model, tokens, mask, tunable(), config.ctx_len, config.bptt, 1.0 / total_count,
                                    config.activation_checkpoint)
        loss_sum += loss
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
    totals = d.all_reduce_sum(torch.tensor([loss_sum, float(n_tokens)], dtype=torch.float64))
    stats = {"loss": float(totals[0]) / total_count, "grad_norm": grad_norm, "loss_tokens": int(total_count),
             "tokens": int(totals[1])}
    if penalty is not None:
        stats["state_l2"] = float(penalty.detach())
    return stats
