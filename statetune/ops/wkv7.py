"""RWKV-7 WKV dispatch: reference loop, chunked torch path, or flash-linear-attention on CUDA."""

from __future__ import annotations

from torch import Tensor

from statetune.ops.dispatch import choose, into
from statetune.ops.reference import wkv7_reference
from statetune.ops.step import wkv7_step


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor,
         impl: str = "auto", out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV over a sequence.

    Args: ``r, w, k, v, a, b`` of shape ``[B, T, H, N]`` (``w`` is the log-decay, ``<= 0``; ``a = -kk``,
    ``b = kk * a_gate`` in the official model), ``state`` ``[B, H, N, N]`` fp32 in [value, key] layout.
    Returns ``(y [B, T, H, N] fp32, final_state [B, H, N, N] fp32)``; the input state is not modified.
    ``out`` (``[B, H, N, N]``, not ``state``; no autograd) receives the final state, which is then returned.
    """
    path = choose(impl, r)
    if path == "reference":
        return into(out, *wkv7_reference(r, w, k, v, a, b, state))
    if r.shape[1] == 1:
        return wkv7_step(r, w, k, v, a, b, state, out)
    if path == "fla":
        from statetune.ops.fla_path import wkv7_fla

        return into(out, *wkv7_fla(r, w, k, v, a, b, state))
    from statetune.ops.chunked7 import wkv7_chunked

    return into(out, *wkv7_chunked(r, w, k, v, a, b, state))
