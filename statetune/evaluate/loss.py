"""Masked loss of a dataset under a given initial state (validation and ``statetune eval``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from statetune.data.loader import TokenDataset, collate
from statetune.model.state import RWKVState
from statetune.train.loss import masked_lm_loss


@dataclass
class LossResult:
    loss: float
    loss_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))


@torch.no_grad()
def dataset_loss(model, data: TokenDataset, state: RWKVState | None, batch_size: int = 8, ctx_len: int = 1024,
                 max_batches: int | None = None) -> LossResult:
    """Mean next-token loss over all mask-1 tokens of ``data``, starting each record from ``state``.

    Records are taken in length order (less padding); sequences longer than ``ctx_len`` run in segments
    with the state carried, exactly as in training.
    """
    order = sorted(range(len(data)), key=lambda i: int(data.lengths[i]))
    total, count = 0.0, 0
    for n, start in enumerate(range(0, len(order), batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        tokens, mask = collate([data[i] for i in order[start:start + batch_size]], model.device)
        loss, k = segmented_loss(model, tokens, mask, state, ctx_len)
        total, count = total + loss, count + k
    return LossResult(total / max(count, 1), count)


def segmented_loss(model, tokens, mask, state, ctx_len: int) -> tuple[float, int]:
    """Summed loss of a padded batch, ``ctx_len`` positions at a time, without gradients."""
    total, count = 0.0, 0
    s = state
    for start in range(0, tokens.shape[1] - 1, ctx_len):
        seg = slice(start, start + ctx_len + 1)
        loss, k, s = masked_lm_loss(model, tokens[:, seg], mask[:, seg], s)
        total, count = total + float(loss), count + k
    return total, count
