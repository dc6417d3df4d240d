"""``statetune smoke``: a one-minute check that this install computes what it should (see
:mod:`statetune.selfcheck`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from statetune.errors import OptionError
from statetune.options import h
from statetune.runtime import DEVICE_HELP


@dataclass
class SmokeOptions:
    """Build a tiny random RWKV model, run it, and check its recurrent consistency."""

    arch: str = field(default="rwkv7", metadata=h("Model version: rwkv7 or rwkv6."))
    device: str = field(default="cpu", metadata=h(DEVICE_HELP))
    tokens: int = field(default=64, metadata=h("Sequence length to run."))

    def __post_init__(self) -> None:
        if self.arch not in ("rwkv7", "rwkv6"):
            raise OptionError(f"--arch: expected rwkv7 or rwkv6, got {self.arch!r}")
        if self.tokens < 2:
            raise OptionError(f"--tokens: must be at least 2, got {self.tokens}")


def smoke(opts: SmokeOptions) -> int:
    """Run the check; returns 0 when every comparison holds, 1 otherwise."""
    from statetune.selfcheck import self_check

    r = self_check(opts.arch, opts.device, opts.tokens)
    print(f"model: {r.description}")
    print(f"prefill {opts.tokens} tokens: {r.tokens_per_s:.0f} tokens/s")
    print(f"sequence vs token-by-token: logits max diff {r.logits_diff:.2e}, state max diff {r.state_diff:.2e}")
    print(f"gradient into the initial state: norm {r.grad_norm:.3e}")
    print("smoke: OK" if r.ok else "smoke: FAILED")
    return 0 if r.ok else 1
