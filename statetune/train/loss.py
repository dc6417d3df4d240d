"""The lean training forward: logits only where the loss needs them, cross-entropy in chunks.

Frozen weights never get gradients; the output layer (65,536 wide for World models) runs only at
positions whose next token carries loss, a chunk of rows at a time and recomputed in the backward pass,
so ``[B, T, V]`` logits never exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from statetune.model.state import RWKVState


def _ce_sum(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum")


def chunked_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Sum of cross-entropies of ``h [M, C] @ weight.T`` against ``targets [M]``, ``chunk`` rows at a time."""
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        args = (h[i:i + chunk], weight, targets[i:i + chunk])
        total = total + (checkpoint(_ce_sum, *args, use_reentrant=False) if h.requires_grad else _ce_sum(*args))
    return total


def masked_lm_loss(model, tokens: Tensor, mask: Tensor, state: RWKVState | None,
                   activation_checkpoint: bool = False, chunk: int = 1024) -> tuple[Tensor, int, RWKVState]:
    """Summed next-token loss over positions whose target has mask 1.

    ``tokens``/``mask`` are ``[B, T]``; position ``t`` predicts token ``t + 1`` and counts when
    ``mask[:, t + 1]`` is 1. Returns ``(loss_sum, n_loss_tokens, state after tokens[:, :-1])``.
    """
    inputs, targets, tmask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].bool()
    h, new_state = model.hidden(inputs, state, checkpoint=activation_checkpoint)
    n = int(tmask.sum())
    if n == 0:
        return h.sum() * 0.0, 0, new_state
    return chunked_cross_entropy(h[tmask], model.head.weight, targets[tmask], chunk), n, new_state


def plain_lm_loss(model, tokens: Tensor, mask: Tensor, state: RWKVState | None) -> tuple[Tensor, int]:
    """The same loss through the full forward (all logits); the reference the lean path is tested on."""
    logits, _ = model(tokens[:, :-1], state)
    tmask = mask[:, 1:].bool()
    loss = F.cross_entropy(logits[tmask].float(), tokens[:, 1:][tmask], reduction="sum")
    return loss, int(tmask.sum())
