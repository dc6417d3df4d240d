"""Plain sequential fp32 WKV recurrences: the source of truth every fast path is tested against.

Layouts (statetune's, for both versions): inputs ``[B, T, H, N]``; state ``[B, H, N, N]`` in fp32 with
layout [value, key], so a read-out is ``y = S @ r``. Decays are given as log-decays ``w <= 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def wkv7_reference(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                   state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV, one token at a time. Returns ``(y [B,T,H,N], final_state [B,H,N,N])`` in fp32."""
    B, T, H, N = r.shape
    f = torch.float32 if r.dtype != torch.float64 else torch.float64
    r, w, k, v, a, b = (x.to(f) for x in (r, w, k, v, a, b))
    S = state.to(f)
    ys = []
    for t in range(T):
        # S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T ;  y_t = S_t r_t
        S = (S * w[:, t].exp().unsqueeze(-2)
             + (S @ a[:, t].unsqueeze(-1)) @ b[:, t].unsqueeze(-2)
             + v[:, t].unsqueeze(-1) @ k[:, t].unsqueeze(-2))
        ys.append((S @ r[:, t].unsqueeze(-1)).squeeze(-1))
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)
    return y, S


def wkv6_reference(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
                   state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV, one token at a time; ``u`` is the per-head bonus ``[H, N]`` (``time_faaaa``)."""
    B, T, H, N = r.shape
    f = torch.float32 if r.dtype != torch.float64 else torch.float64
    r, w, k, v, u = (x.to(f) for x in (r, w, k, v, u))
    S = state.to(f)
    ys = []
    for t in range(T):
        # y_t = S_{t-1} r_t + (r_t . (u * k_t)) v_t ;  S_t = S_{t-1} diag(exp(w_t)) + v_t k_t^T
        rt, kt, vt = r[:, t], k[:, t], v[:, t]
        bonus = (rt * u * kt).sum(-1, keepdim=True) * vt
        ys.append((S @ rt.unsqueeze(-1)).squeeze(-1) + bonus)
        S = S * w[:, t].exp().unsqueeze(-2) + vt.unsqueeze(-1) @ kt.unsqueeze(-2)
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)
    return y, S
