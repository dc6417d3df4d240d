"""An exponential moving average of the trained parameters (``train --ema DECAY``).

Validation, ``state-best`` and ``state-final`` then use the average instead of the latest parameters; the
optimizer keeps stepping the raw ones, so training itself is unchanged. The average is over parameters
(the state tensors themselves for ``--param direct``; the encoder's weights for ``--param encoder``), and
the result is an ordinary state file: it costs nothing at inference.

Early on the decay is ``min(DECAY, (1 + t) / (10 + t))`` after ``t`` optimizer steps, so the average is
not dominated by the starting point (the usual warm-up of parameter averages).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


def ema_decay(decay: float, step: int) -> float:
    """The decay applied after optimizer step ``step`` (1-based): ``DECAY``, warmed up."""
    return min(decay, (1 + step) / (10 + step))


class ParamEMA:
    """A moving average of ``params``, kept outside them; :meth:`applied` swaps it in for a while."""

    def __init__(self, params: list[Tensor], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the parameters after optimizer step ``step`` into the average."""
        weight = 1.0 - ema_decay(self.decay, step)
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach(), weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the average; afterwards their own values again."""
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, own, strict=True):
                    p.copy_(v)

    def state_dict(self) -> list[Tensor]:
        """The average, for a checkpoint (written as it is; :meth:`load_state_dict` copies on the way in)."""
        return list(self.shadow)

    def load_state_dict(self, shadow: list[Tensor]) -> None:
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow,
                                                                                      strict=True)):
            raise ValueError("the saved average does not match the trainable parameters")
        self.shadow = [s.to(p.device, p.dtype).clone() for s, p in zip(shadow, self.params, strict=True)]
