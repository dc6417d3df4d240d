"""Chunk layout and exactly decayed intra-chunk scores, shared by the RWKV-6 and RWKV-7 chunked kernels.

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
"""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=64)
def _span_matrix(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[2m, 2m]`` 0/1 matrix turning per-token exponent gradients of a block pair into ``w`` gradients.

    For the earlier block (rows/cols ``0..m-1``) a key ``s`` spans the decays ``w_j``, ``s < j``: row
    ``j`` sums the columns ``s < j``; for the later block a query ``t`` spans ``w_j``, ``j < t``: row ``j``
    sums the columns ``t > j``. Sums of the gradients of the terms that really contain ``w_j``, nothing
    subtracted: a cumsum-and-difference would cancel catastrophically for strongly decayed tokens.
    """
    one = torch.ones(m, m, dtype=dtype, device=device)
    out = torch.zeros(2 * m, 2 * m, dtype=dtype, device=device)
    out[:m, :m] = one.tril(-1)
    out[m:, m:] = one.triu(1)
    return out


def _level_view(A: Tensor, m: int) -> Tensor:
    """The entries of ``A [G, nq, nk, L, L]`` that level ``m`` fills, as a view ``[G, nq, m, nk, m, nb]``:
    rows of block ``2i+1`` against columns of block ``2i`` (blocks of ``m`` tokens), for every ``i``."""
    G, nq, nk, L, _ = A.shape
    nb = L // (2 * m)
    target = A.view(G, nq, nk, nb, 2, m, nb, 2, m)[:, :, :, :, 1, :, :, 0, :]   # [G, nq, nk, nb, m, nb, m]
    return torch.diagonal(target, dim1=3, dim2=5).permute(0, 1, 3, 2, 4, 5)


class _Pyramid:
    """Decay factors of the recursive halving, grown from blocks of 1 token to the whole chunk.

    For the current block size ``m`` (``d = exp(w)`` per token, ``[G, L, N]``):
    ``P[t]`` = product of ``d`` from the start of ``t``'s block up to, excluding, ``t``;
    ``Sx[s]`` = product of ``d`` after ``s`` up to the end of its block; ``tot`` = product over each block
    ``[G, L/m, N]``. :meth:`grow` doubles ``m`` with one multiplication per half (products of factors
    ``<= 1``: no ``exp`` per level, nothing can overflow). At ``m = L``: ``P = exp(e)`` (exclusive
    cumulative decay), ``Sx`` = decay from each token to the chunk end, ``tot = exp(c_L)``.
    """

    def __init__(self, d: Tensor) -> None:
        self.m = 1
        self.tot = d
        self.P = torch.ones_like(d)
        self.Sx = torch.ones_like(d)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``EQ, EK [G, nb, m, 1, N]``: ``P`` on the later block of each pair, ``Sx`` on the earlier."""
        G, L, N = self.P.shape
        m, nb = self.m, L // (2 * self.m)
        return self.P.view(G, nb, 2, m, 1, N)[:, :, 1], self.Sx.view(G, nb, 2, m, 1, N)[:, :, 0]

    def grow(self) -> None:
        G, L, N = self.P.shape
        m, nb = self.m, L // (2 * self.m)
        tv = self.tot.view(G, nb, 2, 1, N)
        self.P.view(G, nb, 2, m, N)[:, :, 1] *= tv[:, :, 0]     # later half: times the whole earlier half
        self.Sx.view(G, nb, 2, m, N)[:, :, 0] *= tv[:, :, 1]    # earlier half: times the whole later half
        self.tot = (tv[:, :, 0] * tv[:, :, 1]).view(G, nb, N)
        self.m = 2 * m


def _with_own_decay(q: Tensor, d: Tensor, inc: list[int]) -> Tensor:
    """``q [G, nq, L, N]`` with the kinds listed in ``inc`` times ``d`` (a copy if any; ``q`` is kept)."""
    if not inc:
        return q
    q = q.clone()
    for i in inc:
        q[:, i] *= d
    return q


class _Workspace:
    """Scratch buffers reused across the levels (every level has the same number of query and key
    entries), so the level loop allocates almost nothing."""

    def __init__(self, like: Tensor, G: int, L: int, nq: int, nk: int, N: int) -> None:
        half = G * (L // 2) * N
        self.Q, self.K = like.new_empty(half * nq), like.new_empty(half * nk)
        self.blk = like.new_empty(G * (L // 2) * (L // 2) * nq * nk)
        self.g = like.new_empty(2 * half)

    @staticmethod
    def take(buf: Tensor, *shape: int) -> Tensor:
        n = 1
        for x in shape:
            n *= x
        return buf[:n].view(shape)


def _halves(x: Tensor, m: int, half: int) -> Tensor:
    """``x [G, kinds, L, N]`` -> the earlier (``half=0``) or later (``half=1``) block of every pair of
    ``m``-token blocks, as a view ``[G, nb, kinds, m, N]``."""
    G, nk, L, N = x.shape
    return x.view(G, nk, L // (2 * m), 2, m, N)[:, :, :, half].transpose(1, 2)


def _scaled_halves(ws: _Workspace, pyr: _Pyramid, qd: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Level ``pyr.m``: ``Q = q * EQ`` on the later block of each pair and ``K = k * EK`` on the earlier,
    ``[G, nb, nq or nk, m, N]`` (in workspace buffers), and the factors ``EQ, EK [G, nb, 1, m, N]``."""
    G, nq, L, N = qd.shape
    nk = k.shape[1]
    m, nb = pyr.m, L // (2 * pyr.m)
    EQ, EK = (x.transpose(2, 3) for x in pyr.factors())
    Q = torch.mul(_halves(qd, m, 1), EQ, out=ws.take(ws.Q, G, nb, nq, m, N))
    K = torch.mul(_halves(k, m, 0), EK, out=ws.take(ws.K, G, nb, nk, m, N))
    return Q, K, EQ, EK


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
        qd = _with_own_decay(q, d, inc)           # inclusive queries also see their own token's decay
        A = q.new_zeros(G, nq, nk, L, L)
        ws = _Workspace(q, G, L, nq, nk, N)
        pyr = _Pyramid(d)
        while pyr.m < L:
            m, nb = pyr.m, L // (2 * pyr.m)
            if m == 1:                            # adjacent pairs, no decay in between: plain dot products
                qh, kh = _halves(qd, 1, 1)[:, :, :, 0], _halves(k, 1, 0)[:, :, :, 0]    # [G, nb, kinds, N]
                target = _level_view(A, 1).squeeze(4).squeeze(2)                    # [G, nq, nk, nb]
                for i in range(nq):
                    for j in range(nk):
                        target[:, i, j] = torch.linalg.vecdot(qh[:, :, i], kh[:, :, j])
            else:
                Q, K, _, _ = _scaled_halves(ws, pyr, qd, k)
                blk = torch.bmm(Q.view(G * nb, nq * m, N), K.view(G * nb, nk * m, N).mT,
                                out=ws.take(ws.blk, G * nb, nq * m, nk * m))
                _level_view(A, m).copy_(blk.view(G, nb, nq, m, nk, m).permute(0, 2, 3, 4, 5, 1))
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
        pyr = _Pyramid(d)
        if dA is not None:
            dA = dA.contiguous()
            ws = _Workspace(q, G, L, nq, nk, N)
        while pyr.m < L and dA is not None:
            m, nb = pyr.m, L // (2 * pyr.m)
            if m == 1:
                qh, kh = _halves(qd, 1, 1)[:, :, :, 0], _halves(k, 1, 0)[:, :, :, 0]      # [G, nb, kinds, N]
                dqv, dkv = _halves(dqd, 1, 1)[:, :, :, 0], _halves(dk, 1, 0)[:, :, :, 0]
                dblk = _level_view(dA, 1).squeeze(4).squeeze(2).unsqueeze(-1)     # [G, nq, nk, nb, 1]
                for i in range(nq):
                    for j in range(nk):
                        g = dblk[:, i, j].contiguous()
                        dqv[:, :, i].addcmul_(g, kh[:, :, j])
                        dkv[:, :, j].addcmul_(g, qh[:, :, i])
            else:
                Q, K, EQ, EK = _scaled_halves(ws, pyr, qd, k)
                dblk = ws.take(ws.blk, G, nb, nq, m, nk, m)
                dblk.copy_(_level_view(dA, m).permute(0, 5, 1, 2, 3, 4))
                dblk = dblk.view(G * nb, nq * m, nk * m)
                dQ = (dblk @ K.view(G * nb, nk * m, N)).view(G, nb, nq, m, N)
                dK = (dblk.mT @ Q.view(G * nb, nq * m, N)).view(G, nb, nk, m, N)
                _halves(dqd, m, 1).addcmul_(dQ, EQ)
                _halves(dk, m, 0).addcmul_(dK, EK)
                # d/d(exponent) of each factor, then through the local sums of w that built it:
                # g[:, :, 0] for the keys (earlier block), g[:, :, 1] for the queries (later block)
                g = ws.take(ws.g, G, nb, 2, m, N)
                _kind_dot(dK, K, g[:, :, 0])
                _kind_dot(dQ, Q, g[:, :, 1])
                dwv = dw.view(G * nb, 2 * m, N)
                if m == 2:                       # the span matrix has just two ones
                    dwv[:, 1] += g[:, :, 0, 0].reshape(G * nb, N)
                    dwv[:, 2] += g[:, :, 1, 1].reshape(G * nb, N)
                else:
                    Tm = _span_matrix(m, g.dtype, g.device)
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
        Tm = _span_matrix(L, dw.dtype, dw.device)
        if dSx is not None:                       # Sx[s] spans w_j for j > s
            dw.baddbmm_(Tm[:L, :L].expand(G, L, L), dSx * pyr.Sx)
        if dP is not None:                        # P[t] spans w_j for j < t
            dw.baddbmm_(Tm[L:, L:].expand(G, L, L), dP * pyr.P)
        if dtot is not None:
            dw += dtot * pyr.tot
        return dq, dk, dw, du, None


def _kind_dot(x: Tensor, y: Tensor, out: Tensor) -> Tensor:
    """``sum_i x[:, :, i] * y[:, :, i]`` over the kind dim 2 of ``[G, nb, kinds, m, N]``, into ``out``."""
    torch.mul(x[:, :, 0], y[:, :, 0], out=out)
    for i in range(1, x.shape[2]):
        out.addcmul_(x[:, :, i], y[:, :, i])
    return out


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
