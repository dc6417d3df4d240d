"""Masked loss of a dataset under a given initial state (validation and ``statetune eval``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from statetune.data.loader import TokenDataset, collate
from statetune.model.state import RWKVState
from statetune.objective import sequence_loss


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
    with the state carried, through the same segment loop as training (:mod:`statetune.objective`).
    """
    order = sorted(range(len(data)), key=lambda i: int(data.lengths[i]))
    total, count = 0.0, 0
    for n, start in enumerate(range(0, len(order), batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        tokens, mask = collate([data[i] for i in order[start:start + batch_size]], model.device)
        loss, k = sequence_loss(model, tokens, mask, state, ctx_len)
        total, count = total + loss, count + k
    return LossResult(total / max(count, 1), count)

