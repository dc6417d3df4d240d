"""``RWKVState``: the whole recurrent state of an RWKV model, stacked over layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RWKVState:
    """Per layer: the token-shift inputs of time-mix and channel-mix, and the WKV matrices.

    Shapes: ``att_shift [L, B, C]``, ``wkv [L, B, H, N, N]`` (fp32, layout [value, key] so that the read-out
    is ``S @ r``, for RWKV-7 and RWKV-6 alike), ``ffn_shift [L, B, C]``.
    """

    att_shift: Tensor
    wkv: Tensor
    ffn_shift: Tensor

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[1]

    @property
    def n_layer(self) -> int:
        return self.wkv.shape[0]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.att_shift, self.wkv, self.ffn_shift

    def map(self, fn) -> RWKVState:
        """A new state with ``fn`` applied to each of the three tensors."""
        return RWKVState(*(fn(t) for t in self.tensors()))

    def scaled(self, factor: float) -> RWKVState:
        """Every tensor times ``factor``: the straight line from the zero state (0) to this state (1), which
        is what ``state average`` of this state and zeros gives with weights ``factor, 1 - factor``."""
        return self if factor == 1.0 else self.map(lambda t: t * factor)

    def clone(self) -> RWKVState:
        return self.map(torch.clone)

    def detach(self) -> RWKVState:
        return self.map(torch.Tensor.detach)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RWKVState:
        """Move to ``device``; ``dtype`` applies to the shift vectors only (WKV stays fp32)."""
        return RWKVState(self.att_shift.to(device=device, dtype=dtype), self.wkv.to(device=device),
                         self.ffn_shift.to(device=device, dtype=dtype))

    def select(self, index: Tensor | list[int] | slice) -> RWKVState:
        """The states of some batch rows."""
        return self.map(lambda t: t[:, index])

    def expand(self, batch_size: int) -> RWKVState:
        """Repeat a batch-1 state to ``batch_size`` rows (a copy, so rows can diverge)."""
        if self.batch_size != 1:
            raise ValueError(f"expand needs a batch-1 state, got batch {self.batch_size}")
        return self.map(lambda t: t.expand(t.shape[0], batch_size, *t.shape[2:]).clone())

    @staticmethod
    def cat(states: list[RWKVState]) -> RWKVState:
        """Concatenate states along the batch dimension."""
        return RWKVState(*(torch.cat(ts, dim=1) for ts in zip(*(s.tensors() for s in states), strict=True)))
