"""WKV through flash-linear-attention's Triton chunk kernels (CUDA; on CPU only under Triton's interpreter).

Same contracts as :mod:`statetune.ops.reference`. Only layouts differ at this boundary: fla takes
``[B, T, H, K]`` inputs with log-decays (as we do) but keeps its state as ``[B, H, K, V]``, the transpose
of ours (``[B, H, V, K]``, ``y = S @ r``). ``fla`` is imported inside the functions: it needs Triton and a
GPU (or ``TRITON_INTERPRET=1``, which runs the kernels on CPU tensors, slowly, for tests). Keyword
arguments are used throughout because the positional order of ``chunk_rwkv7`` changed across fla releases
(``>= 0.2`` is required).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _common(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).contiguous()


def _decay(w: Tensor) -> Tensor:
    """The log-decay stays fp32 whatever the model's dtype: fla accumulates in fp32, and rounding ``w`` to
    bf16 alone moves the state by ~5e-4 relative (compounded over every step of a chunk)."""
    return w.float().contiguous()


def wkv7_fla(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
             state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV via ``fla.ops.rwkv7.chunk_rwkv7``; returns ``(y, final_state)`` in fp32, our layouts."""
    from fla.ops.rwkv7 import chunk_rwkv7

    dt = r.dtype
    h0 = state.float().transpose(-1, -2).contiguous()          # [B, H, V, K] -> fla's [B, H, K, V]
    y, ht = chunk_rwkv7(r=_common(r, dt), w=_decay(w), k=_common(k, dt), v=_common(v, dt),
                        a=_common(a, dt), b=_common(b, dt), scale=1.0, initial_state=h0,
                        output_final_state=True)
    return y.float(), ht.float().transpose(-1, -2)


def wkv6_fla(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
             state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV via ``fla.ops.rwkv6.chunk_rwkv6``; returns ``(y, final_state)`` in fp32, our layouts."""
    from fla.ops.rwkv6 import chunk_rwkv6

    dt = r.dtype
    h0 = state.float().transpose(-1, -2).contiguous()          # [B, H, V, K] -> fla's [B, H, K, V]
    y, ht = chunk_rwkv6(r=_common(r, dt), k=_common(k, dt), v=_common(v, dt), w=_decay(w),
                        u=_common(u, dt), scale=1.0, initial_state=h0, output_final_state=True)
    return y.float(), ht.float().transpose(-1, -2)
