"""The byte corpus as token ids, random training windows, the training loss and the held-out measures."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from statetune.model.base import RWKVBase

EOT = 0  # the end-of-text id, which joins documents (byte b is id b + 1)


def load_tokens(path: Path) -> Tensor:
    """Byte tokens of a corpus file (byte b -> id b + 1) with each blank-line document separator replaced
    by the end-of-text id 0, which also starts the stream; int16 to keep 25 MB of text in 50 MB."""
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size < 2:
        raise SystemExit(f"{path}: empty corpus")
    ids = raw.astype(np.int16) + 1
    sep = np.nonzero((raw[:-1] == 10) & (raw[1:] == 10))[0]
    ids[sep] = EOT
    ids = np.delete(ids, sep + 1)
    return torch.from_numpy(np.concatenate(([EOT], ids)).astype(np.int16))


def batches(tokens: Tensor, batch: int, ctx: int, g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(inputs, targets)`` of ``batch`` random contiguous windows of ``ctx + 1`` tokens."""
    span = torch.arange(ctx + 1)
    while True:
        starts = torch.randint(0, tokens.numel() - ctx - 1, (batch, 1), generator=g)
        w = tokens[starts + span].long()
        yield w[:, :-1], w[:, 1:]


def lm_loss(logits: Tensor, targets: Tensor, max_logit_penalty: float) -> tuple[Tensor, Tensor]:
    """``(loss to minimise, cross-entropy)``. The penalty is the official trainer's L2Wrap: a push on each
    position's largest logit (``penalty * mean(max^2) / 2``) that keeps logits from drifting upwards."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if max_logit_penalty <= 0:
        return ce, ce
    peak = logits.max(-1).values
    return ce + max_logit_penalty * 0.5 * peak.pow(2).mean(), ce


@torch.no_grad()
def window_loss(model: RWKVBase, tokens: Tensor, n: int, ctx: int, batch: int) -> float:
    """Mean cross-entropy (nats) over ``n`` fixed, evenly spaced windows: a cheap, repeatable val loss."""
    was_training = model.training
    model.eval()
    starts = torch.linspace(0, tokens.numel() - ctx - 2, n).long()
    span = torch.arange(ctx + 1)
    total, count = 0.0, 0
    for s in starts.split(batch):
        w = tokens[s[:, None] + span].long().to(model.device)
        logits, _ = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def stream_bits(model: RWKVBase, tokens: Tensor, streams: int = 8, chunk: int = 1024) -> float:
    """Total bits to encode ``tokens[1:]`` given what precedes each, reading the text as ``streams``
    contiguous pieces in parallel and carrying the recurrent state across chunks (an RNN sees all of its
    piece). Each piece's first token is scored from its predecessor only: a negligible loss of context."""
    model.eval()
    n = (tokens.numel() - 1) // streams * streams
    body = tokens[: n + 1].long()
    x = body[:-1].view(streams, -1)
    y = body[1:].view(streams, -1)
    state = None
    nats = 0.0
    for t in range(0, x.shape[1], chunk):
        logits, state = model(x[:, t:t + chunk].to(model.device), state)
        nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                y[:, t:t + chunk].reshape(-1).to(model.device), reduction="sum").item()
    rest = tokens[n:].long()   # the few tokens that do not fill the last row
    if rest.numel() > 1:
        logits, _ = model(rest[None, :-1].to(model.device))
        nats += F.cross_entropy(logits[0].float(), rest[1:].to(model.device), reduction="sum").item()
    return nats / math.log(2)


def heldout_bits_per_byte(model: RWKVBase, val_path: Path) -> tuple[float, int]:
    """Bits per byte of ``val_path``: the model's code length of the whole file over its size in bytes
    (the end-of-text ids stand for the blank lines between documents; their cost counts)."""
    tokens = load_tokens(val_path)
    n_bytes = val_path.stat().st_size
    return stream_bits(model, tokens) / n_bytes, n_bytes
