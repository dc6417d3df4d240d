"""Exact chunked RWKV-7 WKV (generalized delta rule with diagonal decay) in pure PyTorch, CPU or GPU.

Recurrence (state ``S`` is [value, key]): ``S_t = S_{t-1} (diag(exp(w_t)) + a_t b_t^T) + v_t k_t^T``,
``y_t = S_t r_t``. Inside a chunk of ``L`` tokens starting from state ``S0``, with ``c`` the inclusive and
``e`` the exclusive cumulative log-decay in the chunk, write ``u_s = S_{s-1} a_s`` (the delta-rule
read-out). Unrolling the recurrence gives

    u_s = S0 (a_s * exp(e_s)) + sum_{j<s}  [A_ak[s,j] v_j + A_ab[s,j] u_j]
    y_t = S0 (r_t * exp(c_t)) + sum_{j<=t} [A_rk[t,j] v_j + A_rb[t,j] u_j]
    S_L = S0 diag(exp(c_L)) + sum_j [v_j (k_j * exp(c_L - c_j))^T + u_j (b_j * exp(c_L - c_j))^T]

with ``A_xy[t,j] = sum_n x_t[n] y_j[n] exp(P_t[n] - c_j[n])`` (``P = e`` for ``a``, ``c`` for ``r``), all
built by :func:`statetune.ops.decay.decayed_scores` without ever forming an exponent ``> 0``. The
``u`` system is unit lower triangular, so (the UT / WY representation) ``U = W S0^T + U0`` with
``[W | U0] = (I - A_ab)^{-1} [a * exp(e) | A_ak V]``, independent of ``S0``: one small triangular
inverse per chunk, all chunks at once. What remains sequential is, per chunk, ``U = W S0^T + U0`` and
the state update above: two ``[L, N] x [N, N]`` matmuls in a loop of ``T / L`` steps. Every output is
then a batched matmul: ``y = (r * exp(c)) S0^T + A_rk V + A_rb U``.

The scores, the triangular inverse and the cross-chunk loop are autograd Functions with hand-written
backward passes (fewer, larger operations than autograd would record); the rest is plain autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from statetune.ops.chunks import compute_dtype, from_chunks, pick_chunk, stacked_chunks, to_chunks
from statetune.ops.decay import decayed_scores

# Chosen by measurement (benchmarks/bench_wkv.py: T=1024, 12 heads of 64, fp32, 2 shared CPU cores):
# 32 was fastest or tied for forward+backward at 1 and 2 threads; 16 is close, 64 is ~10-20% slower.
DEFAULT_CHUNK_SIZE7 = 32


def _unit_lower_inverse(A: Tensor) -> Tensor:
    """``(I - A)^{-1}`` for strictly lower triangular ``A [G, L, L]`` (``L`` a power of two).

    Block forward substitution by doubling: with the inverses ``X^-1, Z^-1`` of the two diagonal blocks
    of a ``2m`` block, its lower-left block is ``Z^-1 A_21 X^-1``. ``log2(L)`` batched matmul steps; much
    faster on CPU than a batched triangular solve of small matrices, and as stable.
    """
    G, L, _ = A.shape
    Ti = torch.zeros_like(A)
    Ti.diagonal(dim1=1, dim2=2).fill_(1)
    m = 1
    while m < L:
        nb = L // (2 * m)
        Tv = Ti.view(G, nb, 2, m, nb, 2, m)
        Y = torch.diagonal(A.view(G, nb, 2, m, nb, 2, m)[:, :, 1, :, :, 0, :], dim1=1, dim2=3)   # [G, m, m, nb]
        Y = Y.permute(0, 3, 1, 2)
        if m > 1:
            Xi = torch.diagonal(Tv[:, :, 0, :, :, 0, :], dim1=1, dim2=3).permute(0, 3, 1, 2)
            Zi = torch.diagonal(Tv[:, :, 1, :, :, 1, :], dim1=1, dim2=3).permute(0, 3, 1, 2)
            Y = Zi @ (Y @ Xi)
        torch.diagonal(Tv[:, :, 1, :, :, 0, :], dim1=1, dim2=3).copy_(Y.permute(0, 2, 3, 1))
        m *= 2
    return Ti


class _UnitLowerSolve(torch.autograd.Function):
    """``X_i = (I - A)^{-1} R_i`` for strictly lower triangular ``A`` and several right-hand sides;
    the backward reuses the saved inverse."""

    @staticmethod
    def forward(ctx, A: Tensor, *R: Tensor) -> tuple[Tensor, ...]:
        Ti = _unit_lower_inverse(A)
        X = tuple(Ti @ R_i for R_i in R)
        ctx.save_for_backward(Ti, *X)
        ctx.set_materialize_grads(False)
        return X

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *dX: Tensor | None) -> tuple[Tensor | None, ...]:
        Ti, *X = ctx.saved_tensors
        dR = tuple(None if g is None else Ti.mT @ g for g in dX)
        dA = None
        if ctx.needs_input_grad[0]:
            for dR_i, X_i in zip(dR, X, strict=True):
                if dR_i is not None:
                    dA = dR_i @ X_i.mT if dA is None else dA.baddbmm_(dR_i, X_i.mT)
            if dA is not None:
                dA.tril_(-1)                # only the strictly lower part of A is read
        return (dA, *(g if need else None for g, need in zip(dR, ctx.needs_input_grad[1:], strict=True)))


def unit_lower_solve(A: Tensor, *R: Tensor) -> tuple[Tensor, ...]:
    """Solve ``(I - A) X_i = R_i`` for strictly lower triangular ``A [..., L, L]``, ``R_i [..., L, K_i]``."""
    *lead, L, _ = A.shape
    X = _UnitLowerSolve.apply(A.reshape(-1, L, L).contiguous(), *(R_i.reshape(-1, L, R_i.shape[-1]) for R_i in R))
    return tuple(X_i.view(*lead, L, X_i.shape[-1]) for X_i in X)


class _ChunkScan(torch.autograd.Function):
    """The sequential part: the state carried across chunks, with a hand-written backward.

    Per chunk ``i`` (state ``S_i`` at its start): ``U_i = W_i S_i^T + U0_i`` and
    ``S_{i+1} = S_i diag(g_i) + C0_i + U_i^T bd_i``. Returns every ``S_i`` ``[B, H, n, Nv, Nk]``, every
    ``U_i`` ``[B, H, n, L, Nv]`` and the final state. Only two small matmuls per chunk are sequential,
    forward and backward; every other gradient is one batched matmul after the backward loop.
    """

    @staticmethod
    def forward(ctx, W: Tensor, U0: Tensor, bd: Tensor, C0: Tensor, g: Tensor, S: Tensor):
        # W, U0, bd [B, H, n, L, N];  C0 [B, H, n, N, N];  g [B, H, n, 1, N];  S [B, H, N, N]
        B, H, n, L, N = W.shape
        W, U0, bd, C0, g = (x.reshape(B * H, n, *x.shape[3:]) for x in (W, U0, bd, C0, g))
        S = S.reshape(B * H, N, N)
        S0 = W.new_empty(B * H, n, N, N)
        U = W.new_empty(B * H, n, L, N)
        S0[:, 0] = S
        for i in range(n):                    # results are written straight into their slots
            S_i, U_i = S0[:, i], U[:, i]
            torch.baddbmm(U0[:, i], W[:, i], S_i.mT, out=U_i)
            if i + 1 < n:
                torch.baddbmm(torch.addcmul(C0[:, i], S_i, g[:, i]), U_i.mT, bd[:, i], out=S0[:, i + 1])
            else:
                S = torch.baddbmm(torch.addcmul(C0[:, i], S_i, g[:, i]), U_i.mT, bd[:, i])
        ctx.save_for_backward(W, bd, g, S0, U)
        ctx.BH = (B, H)
        ctx.set_materialize_grads(False)
        return S0.view(B, H, n, N, N), U.view(B, H, n, L, N), S.view(B, H, N, N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dS0: Tensor | None, dU: Tensor | None, dS: Tensor | None):
        W, bd, g, S0, U = ctx.saved_tensors
        BH, n, L, N = W.shape
        B, H = ctx.BH
        Gs = W.new_empty(BH, n, N, N)       # gradient of the state after each chunk
        if dS is None:
            Gs[:, n - 1] = 0
        else:
            Gs[:, n - 1] = dS.reshape(BH, N, N)
        dUt = W.new_zeros(BH, n, L, N) if dU is None else dU.reshape(BH, n, L, N).clone()
        dS0 = None if dS0 is None else dS0.reshape(BH, n, N, N)
        for i in range(n - 1, -1, -1):
            G, dU_i = Gs[:, i], dUt[:, i]
            dU_i.baddbmm_(bd[:, i], G.mT)                      # U_i also feeds S_{i+1} through U_i^T bd_i
            # gradient of S_i: through S_i diag(g_i), through U_i = W_i S_i^T + U0_i, and from outside
            G_prev = torch.baddbmm(G * g[:, i], dU_i.mT, W[:, i], out=Gs[:, i - 1] if i else None)
            if dS0 is not None:
                G_prev += dS0[:, i]
        G = G_prev
        need = ctx.needs_input_grad
        shape = (B, H, n)
        dW = (dUt @ S0).view(*shape, L, N) if need[0] else None
        dbd = (U @ Gs).view(*shape, L, N) if need[2] else None
        dg = (Gs * S0).sum(-2, keepdim=True).view(*shape, 1, N) if need[4] else None
        return (dW, dUt.view(*shape, L, N) if need[1] else None, dbd, Gs.view(*shape, N, N) if need[3] else None,
                dg, G.view(B, H, N, N) if need[5] else None)


def wkv7_chunked(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor,
                 chunk_size: int = DEFAULT_CHUNK_SIZE7) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV, chunked; same contract as :func:`statetune.ops.reference.wkv7_reference`.

    ``r, w, k, v, a, b`` ``[B, T, H, N]`` (``w`` log-decay ``<= 0``), ``state`` ``[B, H, N, N]`` in
    [value, key] layout. Returns ``(y [B, T, H, N], final_state [B, H, N, N])`` in fp32 (float64 if given
    float64). Differentiable in every input, including ``state``; ``state`` is not modified.
    """
    B, T, H, N = r.shape
    f = compute_dtype(r)
    S = state.to(f)
    if T == 0:
        return r.new_zeros(B, 0, H, N, dtype=f), S.clone()
    L = pick_chunk(T, chunk_size)
    # queries (r after its token's decay, a before it) and keys (k, b) stacked: [B, H, n, 2, L, N]
    ra, kb = stacked_chunks((r, a), L, f), stacked_chunks((k, b), L, f)
    w, v = (to_chunks(x, L, f) for x in (w, v))                    # [B, H, n, L, N]
    r, a, k, b = ra[:, :, :, 0], ra[:, :, :, 1], kb[:, :, :, 0], kb[:, :, :, 1]

    # decayed scores of every query kind against every key kind, with the diagonal of r (y_t includes
    # token t itself): [B, H, n, 2, 2, L, L]; plus the chunk's decay factors
    A, c_dec, e_dec, end_dec, chunk_dec = decayed_scores(ra, kb, w, (True, False))
    # [B, H, n, L, L] each; A_rk, A_rb lower triangular with diagonal, A_ak, A_ab strictly lower
    A_rk, A_rb, A_ak, A_ab = A.flatten(3, 4).unbind(3)

    # U = W S0^T + U0 solves (I - A_ab) U = (a * e_dec) S0^T + A_ak V
    W, U0 = unit_lower_solve(A_ab, a * e_dec, A_ak @ v)             # [B, H, n, L, Nk], [B, H, n, L, Nv]
    bd = b * end_dec
    C0 = v.mT @ (k * end_dec)                                      # [B, H, n, Nv, Nk]

    # across chunks: U = W S0^T + U0, S_next = S0 diag(chunk_dec) + V^T (k * end_dec) + U^T bd
    S0, U, S = _ChunkScan.apply(W, U0, bd, C0, chunk_dec, S)      # [B, H, n, Nv, Nk], [B, H, n, L, Nv]

    y = (r * c_dec) @ S0.mT + A_rk @ v + A_rb @ U
    return from_chunks(y, T), S
