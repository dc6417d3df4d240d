"""Direct Preference Optimisation (Rafailov et al., 2023) as a pure function of sequence log-probabilities.

The same loss as TRL's ``DPOTrainer`` with ``loss_type="sigmoid"``: with ``pi`` the tuned state's and
``ref`` the reference's (here: the run's starting state) summed log-probabilities of each completion,
``loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))`` and the implicit rewards are
``beta * (pi - ref)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO losses ``[P]`` and the chosen and rejected rewards ``[P]`` (detached) of ``P`` pairs."""
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
