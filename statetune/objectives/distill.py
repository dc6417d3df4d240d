"""Distillation from a teacher model: the pure loss, and training and measuring a state with it.

At every loss position (target mask 1) the student (the frozen model from the tuned state) is pulled toward
the teacher's next-token distribution: ``loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) *
CE(student, target)``, with ``p^T = softmax(logits / T)`` (Hinton et al.'s ``T^2`` keeps the KL term's
gradient at the same scale for any temperature), averaged over the global batch's loss tokens. The teacher
is any model with the same vocabulary, from its own state; its final hidden states at the loss positions
are computed once per batch without gradients, segment by segment like the student's, and both output
layers run a chunk of positions at a time, so ``[B, T, V]`` logits never exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from statetune.data.loader import Example, TokenDataset, collate
from statetune.model.base import acc_dtype
from statetune.model.state import RWKVState
from statetune.objective import HeadLoss, backward_sequence, masked_lm_loss, segments
from statetune.objectives.base import EvalResult, Segmenting, StateFn, loss_tokens, ppl
from statetune.objectives.config import ObjectiveConfig


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
                 alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per position ``[M]``: the mixed loss, ``KL(teacher || student)`` at ``temperature``, and the
    cross-entropy against ``targets``, from logits ``[M, V]``."""
    logits = student_logits.to(acc_dtype(student_logits.dtype))
    s = F.log_softmax(logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.to(logits.dtype) / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    ce = F.cross_entropy(logits, targets, reduction="none")
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce


def _chunk_sums(h: Tensor, weight: Tensor, h_teacher: Tensor, w_teacher: Tensor, targets: Tensor,
                temperature: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        teacher_logits = F.linear(h_teacher, w_teacher)
    loss, kl, ce = distill_loss(F.linear(h, weight), teacher_logits, targets, temperature, alpha)
    return loss.sum(), kl.detach().sum(), ce.detach().sum()


class DistillObjective:
    """``--objective distill``: the state learns to make the model predict as ``teacher`` does."""

    data_kind = "sft"

    def __init__(self, model, teacher, teacher_state: RWKVState | None, config: ObjectiveConfig, seg: Segmenting,
                 chunk: int = 1024):
        self.model, self.teacher, self.teacher_state, self.seg, self.chunk = model, teacher, teacher_state, seg, chunk
        self.temperature, self.alpha = config.distill_temperature, config.distill_alpha

    @torch.no_grad()
    def teacher_hidden(self, tokens: Tensor, mask: Tensor) -> list[Tensor]:
        """The teacher's final hidden states at each segment's loss positions (``[M_k, C_teacher]`` per
        segment, in the order :func:`statetune.objective.masked_lm_loss` selects them)."""
        out, state = [], self.teacher_state
        for seg in segments(tokens.shape[1], self.seg.ctx_len):
            h, state = self.teacher.hidden(tokens[:, seg][:, :-1], state)
            out.append(h[mask[:, seg][:, 1:].bool()])
        return out

    def head_loss(self, teacher_h: list[Tensor], sums: dict[str, float]) -> HeadLoss:
        """The mixed loss of a segment's loss positions against the teacher's, adding its KL and
        cross-entropy sums to ``sums``."""
        def loss_fn(segment: int, h: Tensor, targets: Tensor, _rows: Tensor) -> Tensor:
            ht = teacher_h[segment]
            total = h.new_zeros((), dtype=acc_dtype(h.dtype))
            for i in range(0, h.shape[0], self.chunk):
                args = (h[i:i + self.chunk], self.model.head.weight, ht[i:i + self.chunk], self.teacher.head.weight,
                        targets[i:i + self.chunk], self.temperature, self.alpha)
                loss, kl, ce = (checkpoint(_chunk_sums, *args, use_reentrant=False) if h.requires_grad
                                else _chunk_sums(*args))
                total = total + loss
                sums["kl"] += float(kl)
                sums["ce"] += float(ce)
            return total

        return loss_fn

    def normalisers(self, groups: list[list[Example]]) -> dict[str, float]:
        return {"loss_tokens": float(sum(loss_tokens(g) for g in groups))}

    def backward(self, groups: list[list[Example]], state_fn: StateFn, totals: dict[str, float]) -> dict[str, float]:
        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "tokens": 0.0}
        for group in groups:
            tokens, mask = collate(group, self.model.device)
            head = self.head_loss(self.teacher_hidden(tokens, mask), sums)
            loss, _ = backward_sequence(self.model, tokens, mask, state_fn(), self.seg.ctx_len, self.seg.bptt,
                                        1.0 / max(1.0, totals["loss_tokens"]), self.seg.activation_checkpoint,
                                        head_loss=head)
            sums["loss"] += loss
            sums["tokens"] += float(tokens.numel())
        return sums

    def summary(self, sums: dict[str, float], totals: dict[str, float]) -> dict[str, float | int]:
        n = max(1.0, totals["loss_tokens"])
        return {"loss": sums["loss"] / n, "kl": sums["kl"] / n, "ce": sums["ce"] / n, "loss_tokens": int(n)}

    @torch.no_grad()
    def evaluate(self, data: TokenDataset, state: RWKVState | None, batch_size: int, max_batches: int | None = None,
                 indices: list[int] | None = None) -> EvalResult:
        """The mixed loss over ``data`` (or its records ``indices``), with its KL and the next-token loss."""
        order = sorted(range(len(data)) if indices is None else indices, key=lambda i: int(data.lengths[i]))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)][:max_batches]
        sums, n = {"loss": 0.0, "kl": 0.0, "ce": 0.0}, 0
        for b in batches:
            group = [data[i] for i in b]
            tokens, mask = collate(group, self.model.device)
            head, s = self.head_loss(self.teacher_hidden(tokens, mask), sums), state
            for k, seg in enumerate(segments(tokens.shape[1], self.seg.ctx_len)):
                loss, _, s = masked_lm_loss(self.model, tokens[:, seg], mask[:, seg], s, head_loss=head, segment=k)
                sums["loss"] += float(loss)
            n += loss_tokens(group)
        out = self.summary(sums, {"loss_tokens": float(n)})
        return EvalResult(out["loss"], {**out, "ppl": ppl(out["ce"])})
