"""``statetune smoke``: a one-minute check that this install computes what it should.

Writes a tiny random RWKV-7 in the official format, loads it, checks that reading a sequence at once
equals reading it token by token, and that a gradient reaches the initial state.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from statetune.device import resolve_device
from statetune.errors import OptionError


@dataclass
class SmokeOptions:
    """Build a tiny random RWKV model, run it, and check its recurrent consistency."""

    arch: str = field(default="rwkv7", metadata={"help": "Model version: rwkv7 or rwkv6."})
    device: str = field(default="cpu", metadata={"help": "Torch device, e.g. cpu or cuda."})
    tokens: int = field(default=64, metadata={"help": "Sequence length to run."})

    def __post_init__(self) -> None:
        if self.arch not in ("rwkv7", "rwkv6"):
            raise OptionError(f"--arch: expected rwkv7 or rwkv6, got {self.arch!r}")
        if self.tokens < 2:
            raise OptionError(f"--tokens: must be at least 2, got {self.tokens}")


def smoke(opts: SmokeOptions) -> int:
    """Run the check; returns 0 when every comparison holds, 1 otherwise."""
    from statetune.model.checkpoint import load_model
    from statetune.model.random_init import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.pth"
        torch.save(random_checkpoint(opts.arch, n_layer=4, n_embd=128, head_size=64, vocab_size=1024), path)
        model = load_model(path, device=resolve_device(opts.device))
    cfg = model.config
    print(f"model: {cfg.version}, {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads of "
          f"{cfg.head_size}, vocab {cfg.vocab_size}")
    tokens = torch.randint(0, cfg.vocab_size, (1, opts.tokens), device=opts.device)
    t0 = time.perf_counter()
    logits, state = model(tokens)
    dt = time.perf_counter() - t0
    step_state, last = None, None
    for t in range(opts.tokens):
        last, step_state = model(tokens[:, t:t + 1], step_state)
    seq_err = (logits[:, -1] - last[:, -1]).abs().max().item()
    wkv_err = (state.wkv - step_state.wkv).abs().max().item()
    s0 = model.zero_state(1)
    s0.wkv.requires_grad_(True)
    loss = model(tokens, s0)[0].float().logsumexp(-1).mean()
    loss.backward()
    grad_norm = s0.wkv.grad.norm().item()
    ok = seq_err < 1e-3 and wkv_err < 1e-3 and grad_norm > 0
    print(f"prefill {opts.tokens} tokens: {opts.tokens / dt:.0f} tokens/s")
    print(f"sequence vs token-by-token: logits max diff {seq_err:.2e}, state max diff {wkv_err:.2e}")
    print(f"gradient into the initial state: norm {grad_norm:.3e}")
    print("smoke: OK" if ok else "smoke: FAILED")
    return 0 if ok else 1
