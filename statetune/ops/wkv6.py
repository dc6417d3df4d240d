"""RWKV-6 WKV dispatch: reference loop, chunked torch path, or flash-linear-attention on CUDA."""

from __future__ import annotations

from torch import Tensor

from statetune.ops.dispatch import choose, into
from statetune.ops.reference import wkv6_reference
from statetune.ops.step import wkv6_step


def wkv6(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor,
         impl: str = "auto", out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV over a sequence.

    Args: ``r, w, k, v`` of shape ``[B, T, H, N]`` (``w`` is the log-decay ``-exp(decay)``, ``<= 0``),
    ``u`` ``[H, N]`` the current-token bonus, ``state`` ``[B, H, N, N]`` fp32 in [value, key] layout.
    Returns ``(y [B, T, H, N] fp32, final_state [B, H, N, N] fp32)``; the input state is not modified.
    ``out`` (``[B, H, N, N]``, not ``state``; no autograd) receives the final state, which is then returned.
    """
    path = choose(impl, r)
    if path == "reference":
        return into(out, *wkv6_reference(r, w, k, v, u, state))
    if r.shape[1] == 1:
        return wkv6_step(r, w, k, v, u, state, out)
    if path == "fla":
        from statetune.ops.fla_path import wkv6_fla

        return into(out, *wkv6_fla(r, w, k, v, u, state))
    from statetune.ops.chunked6 import wkv6_chunked

    return into(out, *wkv6_chunked(r, w, k, v, u, state))
