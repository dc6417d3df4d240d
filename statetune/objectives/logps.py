"""Per-sequence log-probabilities through the segment loop, and their gradient through it.

The preference losses are functions of each sequence's summed log-probability of its loss tokens, ``S_i``.
Their exact gradient for any ``--ctx-len`` comes in two passes: :func:`sequence_logps` runs the segment loop
without gradients to get every ``S_i``; the loss and ``g_i = dLoss/dS_i`` are then computed on those few
numbers; and :func:`row_weighted_ce` makes the segment loop backpropagate the linear surrogate
``sum_i g_i S_i`` (``S_i`` is minus the row's summed cross-entropy), whose gradient at this point is the
loss's. Full BPTT carries it through every segment, as it does the plain loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from statetune.model.base import acc_dtype
from statetune.model.state import RWKVState
from statetune.objective import HeadLoss, segments


def _token_ce(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(h, weight).to(acc_dtype(h.dtype)), targets, reduction="none")


def token_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Cross-entropy of each row of ``h [M, C] @ weight.T`` against ``targets [M]``, ``chunk`` rows at a time."""
    return torch.cat([_token_ce(h[i:i + chunk], weight, targets[i:i + chunk]) for i in range(0, h.shape[0], chunk)])


@torch.no_grad()
def sequence_logps(model, tokens: Tensor, mask: Tensor, state: RWKVState | None,
                   ctx_len: int) -> tuple[Tensor, Tensor]:
    """Each row's summed log-probability of its mask-1 targets, ``[B]`` (fp32, float64 for float64 models),
    and its count of them ``[B]``, segment by segment with the state carried."""
    B = tokens.shape[0]
    logp = torch.zeros(B, dtype=acc_dtype(model.dtype), device=tokens.device)
    for seg in segments(tokens.shape[1], ctx_len):
        t, m = tokens[:, seg], mask[:, seg]
        h, state = model.hidden(t[:, :-1], state)
        tmask = m[:, 1:].bool()
        if tmask.any():
            ce = token_cross_entropy(h[tmask], model.head.weight, t[:, 1:][tmask])
            logp.index_add_(0, tmask.nonzero()[:, 0], -ce)
    return logp, mask[:, 1:].sum(1)


def _weighted_ce(h: Tensor, weight: Tensor, targets: Tensor, w: Tensor) -> Tensor:
    return (_token_ce(h, weight, targets) * w).sum()


def row_weighted_ce(model, row_weights: Tensor, chunk: int = 1024) -> HeadLoss:
    """A head loss for :func:`statetune.objective.backward_sequence`: ``sum_i row_weights[i] * CE_i``, each
    row's summed cross-entropy weighted by its own constant (chunked and recomputed in the backward pass)."""
    def head_loss(_segment: int, h: Tensor, targets: Tensor, rows: Tensor) -> Tensor:
        w = row_weights.to(acc_dtype(h.dtype))[rows]
        total = h.new_zeros((), dtype=acc_dtype(h.dtype))
        for i in range(0, h.shape[0], chunk):
            args = (h[i:i + chunk], model.head.weight, targets[i:i + chunk], w[i:i + chunk])
            total = total + (checkpoint(_weighted_ce, *args, use_reentrant=False) if h.requires_grad
                             else _weighted_ce(*args))
        return total

    return head_loss
