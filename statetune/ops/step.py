"""One-token WKV updates for decoding: the reference recurrences' single step, without the loop around it.

At ``T = 1`` the per-call overhead of the sequence machinery (stacking, per-step lists) costs as much as the
arithmetic, and decoding runs nothing else; these are tested equal to ``statetune.ops.reference``. The new
state is built in one buffer updated in place (``out`` when given, so that a model can write each layer's
state straight into its stacked result): a batched step touches ``B * H * N * N`` floats per layer, and
every temporary of that size is another pass over memory.
"""

from __future__ import annotations

import torch
from torch import Tensor


def wkv7_step(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
              state: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV for ``T = 1``: inputs ``[B, 1, H, N]``, ``state`` ``[B, H, N, N]`` (acc dtype).

    ``out`` (``[B, H, N, N]``, not ``state``; no autograd) receives the new state, which is returned.
    """
    f = state.dtype
    r, w, k, v, a, b = (t[:, 0].to(f).unsqueeze(-2) for t in (r, w, k, v, a, b))      # [B, H, 1, N]
    sa = (state * a).sum(-1, keepdim=True)                                            # S a: [B, H, N, 1]
    S = torch.mul(state, w.exp(), out=out)                     # S' = S diag(w) + (S a) b^T + v k^T
    S.addcmul_(sa, b).addcmul_(v.transpose(-1, -2), k)
    return (S * r).sum(-1).unsqueeze(1), S


def wkv6_step(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
              state: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV for ``T = 1``: inputs ``[B, 1, H, N]``, ``u`` ``[H, N]``, ``state`` ``[B, H, N, N]``.

    ``out`` (``[B, H, N, N]``, not ``state``; no autograd) receives the new state, which is returned.
    """
    f = state.dtype
    r, w, k, v = (t[:, 0].to(f) for t in (r, w, k, v))                                # [B, H, N]
    y = (state * r.unsqueeze(-2)).sum(-1) + (r * u.to(f) * k).sum(-1, keepdim=True) * v
    S = torch.mul(state, w.exp().unsqueeze(-2), out=out).addcmul_(v.unsqueeze(-1), k.unsqueeze(-2))
    return y.unsqueeze(1), S
