"""A check that this install computes what it should: a tiny random RWKV model written in the official format,
loaded back, reading a sequence at once compared with reading it token by token, and a gradient into the
initial state (``statetune smoke``)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from statetune.device import resolve_device

TOLERANCE = 1e-3


@dataclass
class SelfCheck:
    """What :func:`self_check` measured."""

    description: str
    tokens_per_s: float
    logits_diff: float
    state_diff: float
    grad_norm: float

    @property
    def ok(self) -> bool:
        return self.logits_diff < TOLERANCE and self.state_diff < TOLERANCE and self.grad_norm > 0


def self_check(arch: str = "rwkv7", device: str = "cpu", tokens: int = 64) -> SelfCheck:
    """Build a random ``arch`` model (4 layers, width 128), run ``tokens`` random tokens both ways on ``device``."""
    from statetune.model.checkpoint import load_model
    from statetune.model.random_init import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.pth"
        torch.save(random_checkpoint(arch, n_layer=4, n_embd=128, head_size=64, vocab_size=1024), path)
        model = load_model(path, device=resolve_device(device))
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=device)
    t0 = time.perf_counter()
    logits, state = model(ids)
    dt = time.perf_counter() - t0
    step_state, last = None, None
    for t in range(tokens):
        last, step_state = model(ids[:, t:t + 1], step_state)
    s0 = model.zero_state(1)
    s0.wkv.requires_grad_(True)
    model(ids, s0)[0].float().logsumexp(-1).mean().backward()
    return SelfCheck(
        description=f"{cfg.version}, {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads of "
                    f"{cfg.head_size}, vocab {cfg.vocab_size}",
        tokens_per_s=tokens / dt, logits_diff=(logits[:, -1] - last[:, -1]).abs().max().item(),
        state_diff=(state.wkv - step_state.wkv).abs().max().item(), grad_norm=s0.wkv.grad.norm().item())
