"""Chunk layout shared by the RWKV-6 and RWKV-7 chunked kernels: the compute dtype, the chunk length,
and the ``[B, T, H, N]`` <-> ``[B, H, n, L, N]`` reshapes (with the neutral zero padding of the tail)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (so gradcheck is meaningful); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pick_chunk(T: int, chunk_size: int) -> int:
    """Chunk length actually used: a power of two, at most ``chunk_size``, and no longer than needed."""
    if chunk_size < 2 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 2, got {chunk_size}")
    return min(chunk_size, max(2, 1 << (T - 1).bit_length()))


def to_chunks(x: Tensor, L: int, dtype: torch.dtype) -> Tensor:
    """``[B, T, H, N]`` -> ``[B, H, n, L, N]``, zero-padding ``T`` up to ``n * L`` (one contiguous copy).

    Zero padding is neutral for both recurrences: ``w = 0`` is no decay, and ``k = v = a = b = 0`` adds
    nothing to the state, so the state after the padded tail equals the state after token ``T``.
    """
    return stacked_chunks((x,), L, dtype)[:, :, :, 0]


def stacked_chunks(xs: tuple[Tensor, ...], L: int, dtype: torch.dtype) -> Tensor:
    """Several ``[B, T, H, N]`` tensors -> ``[B, H, n, len(xs), L, N]`` in one copy (see :func:`to_chunks`)."""
    x = xs[0].to(dtype).unsqueeze(0) if len(xs) == 1 else torch.stack([t.to(dtype) for t in xs], 0)
    # x: [K, B, T, H, N]
    K, B, T, H, N = x.shape
    n = -(-T // L)
    if n * L != T:
        x = F.pad(x, (0, 0, 0, 0, 0, n * L - T))
    return x.view(K, B, n, L, H, N).permute(1, 4, 2, 0, 3, 5).contiguous()


def from_chunks(y: Tensor, T: int) -> Tensor:
    """``[B, H, n, L, N]`` -> ``[B, T, H, N]`` (drops the padded tail)."""
    B, H, n, L, N = y.shape
    return y.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, N)[:, :T]
