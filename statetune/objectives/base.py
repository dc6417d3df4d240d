"""What every training objective offers the training loop, and the SFT objective (the masked next-token loss).

An objective turns a step's micro-batches into gradients of the global batch's loss in the tuned state, and
measures a dataset. The loop stays the same for all of them: ``normalisers`` gives the local counts the loss
is divided by (summed over processes by the caller), ``backward`` accumulates this process's share of the
gradient and returns its sums, ``summary`` turns the global sums into the step's statistics (``loss`` first),
``evaluate`` measures a dataset from a state (its ``loss`` picks the best state and stops early).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from statetune.data.loader import Example, TokenDataset, collate
from statetune.model.state import RWKVState
from statetune.objective import Bptt, backward_sequence, dataset_loss

StateFn = Callable[[], RWKVState]


@dataclass
class Segmenting:
    """How sequences run: ``--ctx-len`` segments, ``--bptt`` and ``--activation-checkpoint``."""

    ctx_len: int = 1024
    bptt: Bptt = Bptt.full
    activation_checkpoint: bool = False


@dataclass
class EvalResult:
    """A dataset measured from a state: the objective's loss and the fields of the ``val`` event."""

    loss: float
    metrics: dict[str, float | int] = field(default_factory=dict)


class TrainObjective(Protocol):
    data_kind: str  # "sft" (records) or "preference" (pairs)

    def normalisers(self, groups: list[list]) -> dict[str, float]: ...

    def backward(self, groups: list[list], state_fn: StateFn, totals: dict[str, float]) -> dict[str, float]: ...

    def summary(self, sums: dict[str, float], totals: dict[str, float]) -> dict[str, float | int]: ...

    def evaluate(self, data, state: RWKVState | None, batch_size: int, max_batches: int | None = None,
                 indices: list[int] | None = None) -> EvalResult: ...


def loss_tokens(examples: list[Example]) -> int:
    return sum(sum(e.mask[1:]) for e in examples)


class SFTObjective:
    """The masked next-token loss, averaged over the loss tokens of the global batch."""

    data_kind = "sft"

    def __init__(self, model, seg: Segmenting):
        self.model, self.seg = model, seg

    def normalisers(self, groups: list[list[Example]]) -> dict[str, float]:
        return {"loss_tokens": float(sum(loss_tokens(g) for g in groups))}

    def backward(self, groups: list[list[Example]], state_fn: StateFn, totals: dict[str, float]) -> dict[str, float]:
        scale = 1.0 / max(1.0, totals["loss_tokens"])
        loss_sum, n_tokens = 0.0, 0
        for group in groups:
            tokens, mask = collate(group, self.model.device)
            n_tokens += int(tokens.numel())
            loss, _ = backward_sequence(self.model, tokens, mask, state_fn(), self.seg.ctx_len, self.seg.bptt,
                                        scale, self.seg.activation_checkpoint)
            loss_sum += loss
        return {"loss": loss_sum, "tokens": n_tokens}

    def summary(self, sums: dict[str, float], totals: dict[str, float]) -> dict[str, float | int]:
        count = max(1.0, totals["loss_tokens"])
        return {"loss": sums["loss"] / count, "loss_tokens": int(count)}

    def evaluate(self, data: TokenDataset, state: RWKVState | None, batch_size: int, max_batches: int | None = None,
                 indices: list[int] | None = None) -> EvalResult:
        res = dataset_loss(self.model, data, state, batch_size, self.seg.ctx_len, max_batches, indices)
        return EvalResult(res.loss, {"loss": res.loss, "ppl": res.ppl, "loss_tokens": res.loss_tokens})


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))
