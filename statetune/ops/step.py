"""One-token WKV updates for decoding: the reference recurrences' single step, without the loop around it.

At ``T = 1`` the per-call overhead of the sequence machinery (stacking, per-step lists) costs as much as the
arithmetic, and decoding runs nothing else; these are tested equal to ``statetune.ops.reference``.
"""

from __future__ import annotations

from torch import Tensor


def wkv7_step(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
              state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV for ``T = 1``: inputs ``[B, 1, H, N]``, ``state`` ``[B, H, N, N]`` (acc dtype)."""
    f = state.dtype
    r, w, k, v, a, b = (t[:, 0].to(f).unsqueeze(-2) for t in (r, w, k, v, a, b))      # [B, H, 1, N]
    sa = (state * a).sum(-1, keepdim=True)                                            # S a: [B, H, N, 1]
    S = state * w.exp() + sa * b + v.transpose(-1, -2) * k
    return (S * r).sum(-1).unsqueeze(1), S


def wkv6_step(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
              state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV for ``T = 1``: inputs ``[B, 1, H, N]``, ``u`` ``[H, N]``, ``state`` ``[B, H, N, N]``."""
    f = state.dtype
    r, w, k, v = (t[:, 0].to(f) for t in (r, w, k, v))                                # [B, H, N]
    y = (state * r.unsqueeze(-2)).sum(-1) + (r * u.to(f) * k).sum(-1, keepdim=True) * v
    S = state * w.exp().unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
    return y.unsqueeze(1), S
