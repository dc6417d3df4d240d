"""Exactly decayed intra-chunk scores, shared by the RWKV-6 and RWKV-7 chunked kernels.

Decays are per key channel, so the intra-chunk score between query ``t`` and key ``s`` is
``sum_n q[t,n] k[s,n] exp(w[s+1,n] + ... + w[t-1,n])``. Factoring that as ``exp(c_t) * exp(-c_s)`` with
cumulative log-decays ``c`` overflows for strong decays (``w = -20`` per token makes ``exp(-c)`` reach
``exp(640)`` over 32 tokens), so :func:`decayed_scores` splits the chunk recursively in halves and
factors each off-diagonal block around the boundary between its key and query halves: both factors then
span only the tokens between a token and that boundary, every factor is ``<= 1``, and the result is
exact (underflow only ever rounds negligible terms to zero). Its hand-written backward gathers the
gradient of ``w`` over exactly the tokens each factor spans, so that gradient has no cancellation either
(differentiating ``exp(c_t - c_s)`` through a cumsum would subtract large, nearly equal numbers and, in
fp32, lose the tiny true gradient of a strongly decayed channel entirely).
The halving's building blocks live in :mod:`statetune.ops.halving`, the chunk layout in :mod:`statetune.ops.chunks`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from statetune.ops.halving import (
    Pyramid,
    Workspace,
    halves,
    kind_dot,
    level_view,
    scaled_halves,
    span_matrix,
    with_own_decay,
)


class _DecayedScores(torch.autograd.Function):
    """Hierarchical decayed scores and the chunk's decay factors; hand-written backward.

    See :func:`decayed_scores` (here ``q [G, nq, L, N]``, ``k [G, nk, L, N]``, ``w [G, L, N]``,
    ``u [G, N]`` or None). The backward recomputes each level's scaled blocks (cheap elementwise work)
    rather than storing them. The gradient of ``w`` is gathered per level as sums of the gradients of
    each factor's exponent over exactly the tokens that factor spans.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, w: Tensor, u: Tensor | None, inclusive: tuple[bool, ...]):
        G, nq, L, N = q.shape
        nk = k.shape[1]
        inc = [i for i, x in enumerate(inclusive) if x]
        d = torch.exp(w)
        qd = with_own_decay(q, d, inc)           # inclusive queries also see their own token's decay
        A = q.new_zeros(G, nq, nk, L, L)
        ws = Workspace(q, G, L, nq, nk, N)
        pyr = Pyramid(d)
        while pyr.m < L:
            m, nb = pyr.m, L // (2 * pyr.m)
            if m == 1:                            # adjacent pairs, no decay in between: plain dot products
                qh, kh = halves(qd, 1, 1)[:, :, :, 0], halves(k, 1, 0)[:, :, :, 0]    # [G, nb, kinds, N]
                target = level_view(A, 1).squeeze(4).squeeze(2)                    # [G, nq, nk, nb]
                for i in range(nq):
                    for j in range(nk):
                        target[:, i, j] = torch.linalg.vecdot(qh[:, :, i], kh[:, :, j])
            else:
                Q, K, _, _ = scaled_halves(ws, pyr, qd, k)
                blk = torch.bmm(Q.view(G * nb, nq * m, N), K.view(G * nb, nk * m, N).mT,
                                out=ws.take(ws.blk, G * nb, nq * m, nk * m))
                level_view(A, m).copy_(blk.view(G, nb, nq, m, nk, m).permute(0, 2, 3, 4, 5, 1))
            pyr.grow()
        for i in range(nq):                       # the token itself: undecayed, or with the bonus u
            if i in inc or u is not None:
                qi = q[:, i:i + 1] if i in inc else q[:, i:i + 1] * u.view(G, 1, 1, N)
                torch.diagonal(A[:, i], dim1=2, dim2=3).copy_(torch.linalg.vecdot(qi, k))
        ctx.save_for_backward(q, qd, k, w, u)
        ctx.inc = inc
        ctx.set_materialize_grads(False)
        return A, pyr.P * d, pyr.P, pyr.Sx, pyr.tot

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dA, dC, dP, dSx, dtot):
        q, qd, k, w, u = ctx.saved_tensors
        inc = ctx.inc
        G, nq, L, N = q.shape
        nk = k.shape[1]
        d = torch.exp(w)
        dqd, dk, dw = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(w)
        pyr = Pyramid(d)
        if dA is not None:
            dA = dA.contiguous()
            ws = Workspace(q, G, L, nq, nk, N)
        while pyr.m < L and dA is not None:
            m, nb = pyr.m, L // (2 * pyr.m)
            if m == 1:
                qh, kh = halves(qd, 1, 1)[:, :, :, 0], halves(k, 1, 0)[:, :, :, 0]      # [G, nb, kinds, N]
                dqv, dkv = halves(dqd, 1, 1)[:, :, :, 0], halves(dk, 1, 0)[:, :, :, 0]
                dblk = level_view(dA, 1).squeeze(4).squeeze(2).unsqueeze(-1)     # [G, nq, nk, nb, 1]
                for i in range(nq):
                    for j in range(nk):
                        g = dblk[:, i, j].contiguous()
                        dqv[:, :, i].addcmul_(g, kh[:, :, j])
                        dkv[:, :, j].addcmul_(g, qh[:, :, i])
            else:
                Q, K, EQ, EK = scaled_halves(ws, pyr, qd, k)
                dblk = ws.take(ws.blk, G, nb, nq, m, nk, m)
                dblk.copy_(level_view(dA, m).permute(0, 5, 1, 2, 3, 4))
                dblk = dblk.view(G * nb, nq * m, nk * m)
                dQ = (dblk @ K.view(G * nb, nk * m, N)).view(G, nb, nq, m, N)
                dK = (dblk.mT @ Q.view(G * nb, nq * m, N)).view(G, nb, nk, m, N)
                halves(dqd, m, 1).addcmul_(dQ, EQ)
                halves(dk, m, 0).addcmul_(dK, EK)
                # d/d(exponent) of each factor, then through the local sums of w that built it:
                # g[:, :, 0] for the keys (earlier block), g[:, :, 1] for the queries (later block)
                g = ws.take(ws.g, G, nb, 2, m, N)
                kind_dot(dK, K, g[:, :, 0])
                kind_dot(dQ, Q, g[:, :, 1])
                dwv = dw.view(G * nb, 2 * m, N)
                if m == 2:                       # the span matrix has just two ones
                    dwv[:, 1] += g[:, :, 0, 0].reshape(G * nb, N)
                    dwv[:, 2] += g[:, :, 1, 1].reshape(G * nb, N)
                else:
                    Tm = span_matrix(m, g.dtype, g.device)
                    dwv.baddbmm_(Tm.expand(G * nb, 2 * m, 2 * m), g.view(G * nb, 2 * m, N))
            pyr.grow()
        while pyr.m < L:                          # (only when dA is None) still need the final factors
            pyr.grow()
        dq = dqd
        for i in inc:                             # undo qd = q * d for the inclusive kinds
            dw.addcmul_(dqd[:, i], qd[:, i])
            dq[:, i] *= d
        du = None
        if dA is not None:
            for i in range(nq):
                if i not in inc and u is None:
                    continue
                g = torch.diagonal(dA[:, i], dim1=2, dim2=3).unsqueeze(-1)   # [G, nk, L, 1]
                gk = g[:, 0] * k[:, 0]                                       # [G, L, N]
                for j in range(1, nk):
                    gk.addcmul_(g[:, j], k[:, j])
                if i in inc:
                    dq[:, i] += gk
                    dk.addcmul_(g, q[:, i:i + 1])
                else:
                    uu = u.view(G, 1, N)
                    dq[:, i].addcmul_(gk, uu)
                    dk.addcmul_(g, (q[:, i] * uu).unsqueeze(1))
                    du_i = (gk * q[:, i]).sum(1)
                    du = du_i if du is None else du + du_i
        # the chunk-level factors returned by forward
        if dC is not None:                        # exp(c) = P * d
            dw.addcmul_(dC, pyr.P * d)
            dP = dC * d if dP is None else dP + dC * d
        Tm = span_matrix(L, dw.dtype, dw.device)
        if dSx is not None:                       # Sx[s] spans w_j for j > s
            dw.baddbmm_(Tm[:L, :L].expand(G, L, L), dSx * pyr.Sx)
        if dP is not None:                        # P[t] spans w_j for j < t
            dw.baddbmm_(Tm[L:, L:].expand(G, L, L), dP * pyr.P)
        if dtot is not None:
            dw += dtot * pyr.tot
        return dq, dk, dw, du, None



def decayed_scores(q: Tensor, k: Tensor, w: Tensor, inclusive: tuple[bool, ...],
                   bonus: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Decayed scores inside each chunk, and the chunk's decay factors.

    Shapes: ``q`` ``[..., nq, L, N]`` (several query kinds at once), ``k`` ``[..., nk, L, N]``, ``w``
    ``[..., L, N]`` the per-token log-decays (``<= 0``); ``L`` a power of two. Returns

    - ``A [..., nq, nk, L, L]``: for ``s < t``, ``A[i,j,t,s] = sum_n q_i[t,n] k_j[s,n] D_i[t,s,n]`` with
      ``D = exp(w[s+1] + ... + w[t-1])`` for an exclusive query kind (it reads the state before its own
      token's decay: RWKV-6's ``r``, RWKV-7's ``a``) and ``D = exp(w[s+1] + ... + w[t])`` for an
      inclusive one (RWKV-7's ``r``), whose diagonal ``A[i,j,t,t] = q_i[t] . k_j[t]`` is filled too.
      With ``bonus`` (``[..., N]``, RWKV-6's ``u`` per leading index), an exclusive kind's diagonal is
      ``sum_n q_i[t,n] k_j[t,n] bonus[n]``. Zero elsewhere;
    - ``exp(c)`` and ``exp(e)`` (``c[t] = w[0] + ... + w[t]``, ``e[t] = c[t] - w[t]``), the decay from
      each token to the chunk end ``exp(w[s+1] + ... + w[L-1])``, all ``[..., L, N]``, and the whole
      chunk's decay ``exp(w[0] + ... + w[L-1])`` ``[..., 1, N]``.

    How: for block size ``m = 1, 2, ..., L/2`` the chunk is cut into pairs of adjacent blocks; the scores
    of the later (query) block against the earlier (key) block are one batched matmul of ``q`` times the
    decay from its block start with ``k`` times the decay to its block end. Both factors are ``<= 1``
    and span exactly the tokens between the token and the boundary, so nothing can overflow however
    strong the decay. Every ``s < t`` pair is covered at exactly one level; the whole costs about one
    ``L x L x N`` matmul (the lower triangle) plus a few elementwise passes per level.
    """
    *lead, nq, L, N = q.shape
    nk = k.shape[-3]
    G = 1
    for x in lead:
        G *= x
    A, d, P, Sx, tot = _DecayedScores.apply(q.reshape(G, nq, L, N).contiguous(),
                                            k.reshape(G, nk, L, N).contiguous(),
                                            w.reshape(G, L, N).contiguous(),
                                            None if bonus is None else bonus.reshape(G, N).contiguous(),
                                            tuple(inclusive))
    return (A.view(*lead, nq, nk, L, L), d.view(*lead, L, N), P.view(*lead, L, N), Sx.view(*lead, L, N),
            tot.view(*lead, 1, N))
