"""ORPO, odds-ratio preference optimisation (Hong et al., 2024), as a pure function of log-probabilities.

As in TRL's ``ORPOTrainer``: with ``c``, ``r`` the mean per-token log-probabilities of the chosen and
rejected completions, ``log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r))`` and the odds-ratio term is
``-lambda * log sigmoid(log_odds)``, added to the next-token loss on the chosen completions (no reference).
The rewards are ``lambda * c`` and ``lambda * r``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def odds_ratio_loss(chosen_logps: Tensor, rejected_logps: Tensor,
                    orpo_lambda: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-pair odds-ratio terms ``[P]`` (already times ``orpo_lambda``), chosen and rejected rewards and the
    log odds ratios, from mean per-token log-probabilities (``log(1 - e^x)`` as ``log(-expm1(x))``, exact
    near 0)."""
    log_odds = (chosen_logps - rejected_logps) - (torch.log(-torch.expm1(chosen_logps))
                                                  - torch.log(-torch.expm1(rejected_logps)))
    losses = -orpo_lambda * F.logsigmoid(log_odds)
    return losses, orpo_lambda * chosen_logps.detach(), orpo_lambda * rejected_logps.detach(), log_odds.detach()


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_counts: Tensor, rejected_counts: Tensor,
              orpo_lambda: float, n_pairs: float, n_chosen_tokens: float) -> Tensor:
    """The ORPO loss of a batch from summed log-probabilities: the chosen completions' next-token loss
    (summed over their tokens, divided by ``n_chosen_tokens``) plus the odds-ratio terms divided by
    ``n_pairs``; the divisors are the global batch's, so shares of it add up to its loss."""
    terms, _, _, _ = odds_ratio_loss(chosen_logps / chosen_counts, rejected_logps / rejected_counts, orpo_lambda)
    return -chosen_logps.sum() / n_chosen_tokens + terms.sum() / n_pairs
