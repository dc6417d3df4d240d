"""DPO and ORPO training on preference pairs: per-sequence log-probabilities through the segment loop.

A step runs the pairs' chosen and rejected records as one batch: first without gradients, to get each
record's summed log-probability ``S_i`` (and, for DPO, the reference's, from the run's starting state); the
loss of the global batch is then a function of those numbers (:mod:`statetune.objectives.dpo`,
:mod:`statetune.objectives.orpo`), whose gradient ``dLoss/dS_i`` weights each record's cross-entropy in a
second, backpropagated pass (:func:`statetune.objectives.logps.row_weighted_ce`): the exact gradient, for
any ``--ctx-len``, with full BPTT. Per pair, a DPO step costs three forward passes and one backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from statetune.data.loader import collate
from statetune.data.pairs import Pair, PreferenceDataset
from statetune.model.state import RWKVState
from statetune.objective import backward_sequence
from statetune.objectives.base import EvalResult, Segmenting, StateFn, loss_tokens, ppl
from statetune.objectives.config import Objective, ObjectiveConfig
from statetune.objectives.dpo import dpo_loss
from statetune.objectives.logps import row_weighted_ce, sequence_logps
from statetune.objectives.orpo import odds_ratio_loss


class PreferenceObjective:
    """``--objective dpo`` (against the reference state ``reference``) or ``--objective orpo``."""

    data_kind = "preference"

    def __init__(self, model, config: ObjectiveConfig, reference: RWKVState, seg: Segmenting):
        self.model, self.config, self.seg = model, config, seg
        self.dpo = config.objective == Objective.dpo
        self.reference = reference.detach()
        self._ref_cache: dict[tuple, Tensor] = {}  # validation batches' reference log-probs (never change)

    def normalisers(self, groups: list[list[Pair]]) -> dict[str, float]:
        return {"pairs": float(sum(len(g) for g in groups)),
                "chosen_tokens": float(sum(loss_tokens([p.chosen for p in g]) for g in groups))}

    def _batch(self, group: list[Pair]) -> tuple[Tensor, Tensor]:
        return collate([p.chosen for p in group] + [p.rejected for p in group], self.model.device)

    def _terms(self, logp: Tensor, counts: Tensor, ref: Tensor | None, totals: dict[str, float]) -> dict[str, Tensor]:
        """The loss of one batch's pairs (divided by the global batch's counts) and its parts, from the
        summed log-probabilities ``logp [2P]`` (chosen rows first) and the reference's ``ref``."""
        P = logp.shape[0] // 2
        c, r = logp[:P], logp[P:]
        n_pairs, n_chosen = max(1.0, totals["pairs"]), max(1.0, totals["chosen_tokens"])
        nll = -c.sum()
        if self.dpo:
            losses, rc, rr = dpo_loss(c, r, ref[:P], ref[P:], self.config.beta)
            loss = losses.sum() / n_pairs
        else:
            losses, rc, rr, _ = odds_ratio_loss(c / counts[:P], r / counts[P:], self.config.orpo_lambda)
            loss = nll / n_chosen + losses.sum() / n_pairs
        return {"loss": loss, "pair_loss": losses.detach().sum(), "nll": nll.detach(),
                "correct": (rc > rr).sum(), "margin": (rc - rr).sum()}

    def backward(self, groups: list[list[Pair]], state_fn: StateFn, totals: dict[str, float]) -> dict[str, float]:
        sums = {"pair_loss": 0.0, "nll": 0.0, "correct": 0.0, "margin": 0.0, "tokens": 0.0}
        for group in groups:
            tokens, mask = self._batch(group)
            with torch.no_grad():
                state = state_fn()
            logp, counts = sequence_logps(self.model, tokens, mask, state, self.seg.ctx_len)
            ref = sequence_logps(self.model, tokens, mask, self.reference, self.seg.ctx_len)[0] if self.dpo else None
            logp = logp.double().requires_grad_()
            terms = self._terms(logp, counts.double(), None if ref is None else ref.double(), totals)
            terms["loss"].backward()
            # the surrogate sum_i g_i S_i = -sum_i g_i CE_i has the loss's gradient at this point
            backward_sequence(self.model, tokens, mask, state_fn(), self.seg.ctx_len, self.seg.bptt, 1.0,
                              self.seg.activation_checkpoint, head_loss=row_weighted_ce(self.model, -logp.grad))
            for k in ("pair_loss", "nll", "correct", "margin"):
                sums[k] += float(terms[k])
            sums["tokens"] += float(tokens.numel())
        return sums

    def summary(self, sums: dict[str, float], totals: dict[str, float]) -> dict[str, float | int]:
        n_pairs, n_chosen = max(1.0, totals["pairs"]), max(1.0, totals["chosen_tokens"])
        chosen_loss = sums["nll"] / n_chosen
        loss = sums["pair_loss"] / n_pairs + (0.0 if self.dpo else chosen_loss)
        return {"loss": loss, "chosen_loss": chosen_loss, "accuracy": sums["correct"] / n_pairs,
                "margin": sums["margin"] / n_pairs, "pairs": int(n_pairs), "loss_tokens": int(n_chosen)}

    @torch.no_grad()
    def evaluate(self, data: PreferenceDataset, state: RWKVState | None, batch_size: int,
                 max_batches: int | None = None, indices: list[int] | None = None) -> EvalResult:
        """The objective's loss over the pairs (or those at ``indices``), with the preference accuracy (how
        often the chosen completion gets the larger reward), the mean reward margin and the next-token loss
        on the chosen completions."""
        order = sorted(range(len(data)) if indices is None else indices, key=lambda i: int(data.lengths[i]))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)][:max_batches]
        pairs = [[data[i] for i in b] for b in batches]
        totals = self.normalisers(pairs)
        sums = {"pair_loss": 0.0, "nll": 0.0, "correct": 0.0, "margin": 0.0}
        for b, group in zip(batches, pairs, strict=True):
            tokens, mask = self._batch(group)
            logp, counts = sequence_logps(self.model, tokens, mask, state, self.seg.ctx_len)
            ref = self._reference(data, b, tokens, mask) if self.dpo else None
            terms = self._terms(logp.double(), counts.double(), ref, totals)
            for k in sums:
                sums[k] += float(terms[k])
        out = self.summary(sums, totals)
        return EvalResult(out["loss"], {**out, "chosen_ppl": ppl(out["chosen_loss"])})

    def _reference(self, data: PreferenceDataset, batch: list[int], tokens: Tensor, mask: Tensor) -> Tensor:
        key = (str(data.path), tuple(batch))
        if key not in self._ref_cache:
            self._ref_cache[key] = sequence_logps(self.model, tokens, mask, self.reference,
                                                  self.seg.ctx_len)[0].double()
        return self._ref_cache[key]
