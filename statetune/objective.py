"""The objective state tuning minimises, and the one segment loop that training and evaluation share.

The loss is the summed next-token cross-entropy at positions whose target has mask 1. Frozen weights
never get gradients; the output layer (65,536 wide for World models) runs only at those positions, a
chunk of rows at a time and recomputed in the backward pass, so ``[B, T, V]`` logits never exist at once.

A sequence longer than ``ctx_len`` runs in segments of ``ctx_len`` positions with the state carried over.
With full backpropagation through time (``Bptt.full``) the gradient is that of one unsegmented pass at
bounded memory: a forward sweep without gradients keeps only the states at segment borders, then a
reverse sweep rebuilds one segment at a time from its border state, newest first, backpropagates its
loss together with the gradient carried into its output state, and hands the gradient of its input state
to the segment before it. The first segment's input is the tuned state itself, so the last backward of
the sweep reaches the trained parameters. ``ctx_len`` is then a memory knob only. ``Bptt.truncated``
backpropagates the first segment alone (later segments are counted in the loss but teach nothing).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from statetune.data.loader import TokenDataset, collate
from statetune.errors import check_finite
from statetune.model.base import acc_dtype
from statetune.model.state import RWKVState


class Bptt(enum.StrEnum):
    """How far the gradient of a long sequence's loss travels back through the carried state."""

    full = "full"
    truncated = "truncated"


def _ce_sum(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(h, weight).to(acc_dtype(h.dtype)), targets, reduction="sum")


def chunked_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Sum of cross-entropies of ``h [M, C] @ weight.T`` against ``targets [M]``, ``chunk`` rows at a time."""
    total = h.new_zeros((), dtype=acc_dtype(h.dtype))  # fp32, or float64 for float64 models (gradcheck)
    for i in range(0, h.shape[0], chunk):
        args = (h[i:i + chunk], weight, targets[i:i + chunk])
        total = total + (checkpoint(_ce_sum, *args, use_reentrant=False) if h.requires_grad else _ce_sum(*args))
    return total


#: ``head_loss(segment, h [M, C], targets [M], rows [M]) -> summed loss``: what an objective computes from the
#: final hidden states at a segment's loss positions (``rows`` says which batch row each belongs to).
HeadLoss = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def masked_lm_loss(model, tokens: Tensor, mask: Tensor, state: RWKVState | None,
                   activation_checkpoint: bool = False, chunk: int = 1024, head_loss: HeadLoss | None = None,
                   segment: int = 0) -> tuple[Tensor, int, RWKVState]:
    """Summed next-token loss over positions whose target has mask 1, in one pass (no segments).

    ``tokens``/``mask`` are ``[B, T]``; position ``t`` predicts token ``t + 1`` and counts when
    ``mask[:, t + 1]`` is 1. Returns ``(loss_sum, n_loss_tokens, state after tokens[:, :-1])``. Another
    objective replaces the cross-entropy by its ``head_loss`` (called with ``segment``, the window's index).
    """
    inputs, targets, tmask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].bool()
    h, new_state = model.hidden(inputs, state, checkpoint=activation_checkpoint)
    n = int(tmask.sum())
    if n == 0:
        return h.sum() * 0.0, 0, new_state
    if head_loss is not None:
        return head_loss(segment, h[tmask], targets[tmask], tmask.nonzero()[:, 0]), n, new_state
    return chunked_cross_entropy(h[tmask], model.head.weight, targets[tmask], chunk), n, new_state


def plain_lm_loss(model, tokens: Tensor, mask: Tensor, state: RWKVState | None) -> tuple[Tensor, int]:
    """The same loss through the full forward (all logits); the reference the lean path is tested on."""
    logits, _ = model(tokens[:, :-1], state)
    tmask = mask[:, 1:].bool()
    loss = F.cross_entropy(logits[tmask].to(acc_dtype(logits.dtype)), tokens[:, 1:][tmask], reduction="sum")
    return loss, int(tmask.sum())


def segments(length: int, ctx_len: int) -> list[slice]:
    """Windows of a ``length``-token sequence, each ``ctx_len`` inputs plus the target after the last.

    Consecutive windows share one token: the last target of one is the first input of the next, so every
    position is predicted exactly once and the state after one window's inputs starts the next.
    """
    if ctx_len < 1:
        raise ValueError(f"ctx_len must be at least 1, got {ctx_len}")
    return [slice(s, s + ctx_len + 1) for s in range(0, length - 1, ctx_len)]


@torch.no_grad()
def sequence_loss(model, tokens: Tensor, mask: Tensor, state: RWKVState | None,
                  ctx_len: int) -> tuple[float, int]:
    """Summed loss and loss-token count of a padded batch ``[B, T]``, segment by segment, without gradients."""
    total, count = 0.0, 0
    for seg in segments(tokens.shape[1], ctx_len):
        loss, n, state = masked_lm_loss(model, tokens[:, seg], mask[:, seg], state)
        total, count = total + float(loss), count + n
    return total, count


@dataclass
class LossResult:
    """The mean loss per loss token of a dataset, and how many loss tokens it was measured on."""

    loss: float
    loss_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def checked(self, source: str | None = None) -> LossResult:
        """This result, or :class:`~statetune.errors.NonFiniteError` naming ``source`` (the start state and
        its scale) when the loss is NaN or infinite: what a report shows must be a number. (The training
        guard and the learning-rate search read a non-finite loss themselves: a stop, a diverged trial.)"""
        check_finite(self.loss, "the loss", source)
        return self


@torch.no_grad()
def dataset_loss(model, data: TokenDataset, state: RWKVState | None, batch_size: int = 8, ctx_len: int = 1024,
                 max_batches: int | None = None, indices: list[int] | None = None) -> LossResult:
    """Mean next-token loss over all mask-1 tokens of ``data`` (or of its records ``indices``), starting each
    record from ``state`` (validation during training and ``statetune eval``).

    Records are taken in length order (less padding); sequences longer than ``ctx_len`` run in segments
    with the state carried, through the same segment loop as training.
    """
    order = sorted(range(len(data)) if indices is None else indices, key=lambda i: int(data.lengths[i]))
    total, count = 0.0, 0
    for n, start in enumerate(range(0, len(order), batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        tokens, mask = collate([data[i] for i in order[start:start + batch_size]], model.device)
        loss, k = sequence_loss(model, tokens, mask, state, ctx_len)
        total, count = total + loss, count + k
    return LossResult(total / max(count, 1), count)


def backward_sequence(model, tokens: Tensor, mask: Tensor, state: RWKVState, ctx_len: int,
                      bptt: Bptt = Bptt.full, scale: float = 1.0, activation_checkpoint: bool = False,
                      head_loss: HeadLoss | None = None) -> tuple[float, int]:
    """Backpropagate ``scale`` times the summed loss of a padded batch into whatever ``state`` was computed
    from (the tuned parameters), segment by segment; returns ``(loss_sum, n_loss_tokens)`` unscaled.

    ``state`` is a batch-1 or batch-``B`` state carrying an autograd graph; gradients accumulate into the
    leaves' ``.grad`` as with ``Tensor.backward``. Memory holds one segment's activations plus one border
    state per segment (``L x B x (2C + H N^2)`` floats each). ``head_loss`` replaces the cross-entropy (see
    :func:`masked_lm_loss`); it is called once per segment.
    """
    windows = segments(tokens.shape[1], ctx_len)
    if bptt == Bptt.truncated or len(windows) == 1:
        return _backward_truncated(model, tokens, mask, state, windows, scale, activation_checkpoint, head_loss)
    borders = [state]  # the input state of each window; the first keeps its graph to the parameters
    with torch.no_grad():
        s = state.detach()
        for seg in windows[:-1]:
            _, s = model.hidden(tokens[:, seg][:, :-1], s)
            borders.append(s)
    total, count, carried = 0.0, 0, None
    for k in reversed(range(len(windows))):
        s_in = borders[k] if k == 0 else borders[k].map(lambda t: t.detach().requires_grad_())
        borders[k] = None  # the reverse sweep frees each border once used
        loss, n = _segment_backward(model, tokens[:, windows[k]], mask[:, windows[k]], s_in, carried, scale,
                                    activation_checkpoint, head_loss, k)
        carried = [t.grad for t in s_in.tensors()] if k > 0 else None
        total, count = total + loss, count + n
    return total, count


def _segment_backward(model, tokens: Tensor, mask: Tensor, s_in: RWKVState, carried: list[Tensor | None] | None,
                      scale: float, activation_checkpoint: bool, head_loss: HeadLoss | None,
                      k: int) -> tuple[float, int]:
    """Rebuild one segment from its input state and backpropagate ``scale * loss + <carried, output state>``.

    A function of its own so that the segment's graph (held by its loss and output state) is gone before
    the next segment is rebuilt: peak memory is one segment's, not two.
    """
    with torch.enable_grad():
        loss, n, s_out = masked_lm_loss(model, tokens, mask, s_in, activation_checkpoint, head_loss=head_loss,
                                        segment=k)
    roots, grads = [loss * scale], [None]
    if carried is not None:
        for t, g in zip(s_out.tensors(), carried, strict=True):
            if t.requires_grad and g is not None:
                roots.append(t)
                grads.append(g)
    _backward(roots, grads)
    return float(loss.detach()), n


def _backward_truncated(model, tokens: Tensor, mask: Tensor, state: RWKVState, windows: list[slice],
                        scale: float, activation_checkpoint: bool, head_loss: HeadLoss | None) -> tuple[float, int]:
    total, count = 0.0, 0
    for k, seg in enumerate(windows):
        if k == 0:  # the gradient reaches the initial state from the first segment only
            with torch.enable_grad():
                loss, n, state = masked_lm_loss(model, tokens[:, seg], mask[:, seg], state, activation_checkpoint,
                                                head_loss=head_loss)
            _backward([loss * scale], [None])
        else:
            with torch.no_grad():
                loss, n, state = masked_lm_loss(model, tokens[:, seg], mask[:, seg], state, head_loss=head_loss,
                                                segment=k)
        state = state.detach()
        total, count = total + float(loss.detach()), count + n
    return total, count


def _backward(roots: list[Tensor], grads: list[Tensor | None]) -> None:
    """``torch.autograd.backward`` over the roots that have a graph (a state with no trainable input has none)."""
    pairs = [(r, g) for r, g in zip(roots, grads, strict=True) if r.requires_grad]
    if pairs:
        torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
