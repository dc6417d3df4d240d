"""The recursive halving behind :func:`statetune.ops.decay.decayed_scores`: its building blocks.

A chunk of ``L`` tokens is cut into pairs of adjacent blocks of ``m = 1, 2, ..., L/2`` tokens. :class:`Pyramid`
holds the decay factors of the current level (products of per-token decays ``<= 1``, grown one level at a
time), :func:`scaled_halves` scales the later block's queries and the earlier block's keys by them,
:func:`level_view` names the entries of the score matrix a level fills, and :func:`span_matrix` turns
per-token exponent gradients into ``w`` gradients over exactly the tokens each factor spans (no
cumsum-and-difference, so no cancellation). :class:`Workspace` keeps the level loop free of allocations.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=64)
def span_matrix(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
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


def level_view(A: Tensor, m: int) -> Tensor:
    """The entries of ``A [G, nq, nk, L, L]`` that level ``m`` fills, as a view ``[G, nq, m, nk, m, nb]``:
    rows of block ``2i+1`` against columns of block ``2i`` (blocks of ``m`` tokens), for every ``i``."""
    G, nq, nk, L, _ = A.shape
    nb = L // (2 * m)
    target = A.view(G, nq, nk, nb, 2, m, nb, 2, m)[:, :, :, :, 1, :, :, 0, :]   # [G, nq, nk, nb, m, nb, m]
    return torch.diagonal(target, dim1=3, dim2=5).permute(0, 1, 3, 2, 4, 5)


class Pyramid:
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


def with_own_decay(q: Tensor, d: Tensor, inc: list[int]) -> Tensor:
    """``q [G, nq, L, N]`` with the kinds listed in ``inc`` times ``d`` (a copy if any; ``q`` is kept)."""
    if not inc:
        return q
    q = q.clone()
    for i in inc:
        q[:, i] *= d
    return q


class Workspace:
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


def halves(x: Tensor, m: int, half: int) -> Tensor:
    """``x [G, kinds, L, N]`` -> the earlier (``half=0``) or later (``half=1``) block of every pair of
    ``m``-token blocks, as a view ``[G, nb, kinds, m, N]``."""
    G, nk, L, N = x.shape
    return x.view(G, nk, L // (2 * m), 2, m, N)[:, :, :, half].transpose(1, 2)


def scaled_halves(ws: Workspace, pyr: Pyramid, qd: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Level ``pyr.m``: ``Q = q * EQ`` on the later block of each pair and ``K = k * EK`` on the earlier,
    ``[G, nb, nq or nk, m, N]`` (in workspace buffers), and the factors ``EQ, EK [G, nb, 1, m, N]``."""
    G, nq, L, N = qd.shape
    nk = k.shape[1]
    m, nb = pyr.m, L // (2 * pyr.m)
    EQ, EK = (x.transpose(2, 3) for x in pyr.factors())
    Q = torch.mul(halves(qd, m, 1), EQ, out=ws.take(ws.Q, G, nb, nq, m, N))
    K = torch.mul(halves(k, m, 0), EK, out=ws.take(ws.K, G, nb, nk, m, N))
    return Q, K, EQ, EK



def kind_dot(x: Tensor, y: Tensor, out: Tensor) -> Tensor:
    """``sum_i x[:, :, i] * y[:, :, i]`` over the kind dim 2 of ``[G, nb, kinds, m, N]``, into ``out``."""
    torch.mul(x[:, :, 0], y[:, :, 0], out=out)
    for i in range(1, x.shape[2]):
        out.addcmul_(x[:, :, i], y[:, :, i])
    return out
