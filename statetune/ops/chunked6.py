"""Exact chunked RWKV-6 WKV in pure PyTorch (CPU or GPU).

The sequence is cut into chunks of ``L`` tokens. Inside a chunk everything is batched matrix products
(the GLA-style chunked form, with scores from :func:`statetune.ops.decay.decayed_scores`, exact for any
decay strength); only the ``[N, N]`` state is carried from chunk to chunk, by a short loop over chunks
(``T / L`` steps), never over tokens.

The loop over chunks (:class:`_DiagScan`) has a hand-written backward; everything else is plain autograd
over batched matmuls and elementwise ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from statetune.ops.chunks import compute_dtype, from_chunks, pick_chunk, to_chunks
from statetune.ops.decay import decayed_scores

# Chosen by measurement (benchmarks/bench_wkv.py: T=1024, 12 heads of 64, fp32, 2 shared CPU cores):
# 32 was fastest or tied for forward+backward at 1 and 2 threads; 16 is close, 64 is ~10-20% slower.
DEFAULT_CHUNK_SIZE6 = 32


class _DiagScan(torch.autograd.Function):
    """``S_{i+1} = S_i diag(g_i) + C_i`` across chunks; returns every ``S_i`` and the final state.

    ``g [B, H, n, 1, N]``, ``C [B, H, n, N, N]``, ``S [B, H, N, N]``. The backward loop carries only the
    state gradient; the gradients of ``g`` and ``C`` are then one batched pass each.
    """

    @staticmethod
    def forward(ctx, g: Tensor, C: Tensor, S: Tensor):
        n = C.shape[2]
        S0 = C.new_empty(C.shape)
        S0[:, :, 0] = S
        for i in range(n - 1):                # each state is written straight into its slot
            torch.addcmul(C[:, :, i], S0[:, :, i], g[:, :, i], out=S0[:, :, i + 1])
        S = torch.addcmul(C[:, :, n - 1], S0[:, :, n - 1], g[:, :, n - 1])
        ctx.save_for_backward(g, S0)
        ctx.set_materialize_grads(False)
        return S0, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dS0: Tensor | None, dS: Tensor | None):
        g, S0 = ctx.saved_tensors
        n = S0.shape[2]
        Gs = torch.empty_like(S0)            # gradient of the state after each chunk
        if dS is None:
            Gs[:, :, n - 1] = 0
        else:
            Gs[:, :, n - 1] = dS
        for i in range(n - 1, 0, -1):
            G = Gs[:, :, i - 1]
            if dS0 is None:
                torch.mul(Gs[:, :, i], g[:, :, i], out=G)
            else:
                torch.addcmul(dS0[:, :, i], Gs[:, :, i], g[:, :, i], out=G)
        G = Gs[:, :, 0] * g[:, :, 0]
        if dS0 is not None:
            G += dS0[:, :, 0]
        need = ctx.needs_input_grad
        return ((Gs * S0).sum(-2, keepdim=True) if need[0] else None, Gs if need[1] else None,
                G if need[2] else None)


def wkv6_chunked(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor,
                 chunk_size: int = DEFAULT_CHUNK_SIZE6) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV, chunked; same contract as :func:`statetune.ops.reference.wkv6_reference`.

    ``r, w, k, v`` ``[B, T, H, N]`` (``w`` log-decay ``<= 0``), ``u`` ``[H, N]``, ``state``
    ``[B, H, N, N]`` in [value, key] layout. Returns ``(y [B, T, H, N], final_state [B, H, N, N])`` in
    fp32 (float64 if given float64). Differentiable in every input, including ``state``, which is not
    modified. ``chunk_size`` must be a power of two.
    """
    B, T, H, N = r.shape
    f = compute_dtype(r)
    S = state.to(f)
    if T == 0:
        return r.new_zeros(B, 0, H, N, dtype=f), S.clone()
    L = pick_chunk(T, chunk_size)
    r, w, k, v = (to_chunks(x, L, f) for x in (r, w, k, v))     # [B, H, n, L, N]
    bonus = u.to(f).view(1, H, 1, N).expand(B, H, r.shape[2], N)

    # y_t = S_{t-1} r_t + (r_t . (u * k_t)) v_t, with S_{t-1} expanded inside the chunk; the bonus term
    # is the diagonal of A
    A, _, e_dec, end_dec, chunk_dec = decayed_scores(r.unsqueeze(-3), k.unsqueeze(-3), w, (False,), bonus)
    A = A.view(B, H, -1, L, L)
    # state update over a chunk: S' = S diag(chunk_dec) + V^T (K * end_dec)
    C = v.mT @ (k * end_dec)                                      # [B, H, n, Nv, Nk]
    S0, S = _DiagScan.apply(chunk_dec, C, S)                      # S0 [B, H, n, Nv, Nk]: state at chunk start
    y = (r * e_dec) @ S0.mT + A @ v
    return from_chunks(y, T), S
