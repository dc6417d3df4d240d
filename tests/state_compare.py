"""What the model comparison tests share: a reproducible random state, and a state comparison that names the
tensor (``att_shift``, ``wkv`` or ``ffn_shift``) that differs."""

from __future__ import annotations

import torch

from statetune.model.state import RWKVState

STATE_NAMES = ("att_shift", "wkv", "ffn_shift")


def random_state(model, batch: int, seed: int) -> RWKVState:
    """A state of ``batch`` rows for ``model`` with normal entries (the WKV state at half scale), from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    s = model.zero_state(batch)
    return RWKVState(torch.randn(s.att_shift.shape, generator=g), torch.randn(s.wkv.shape, generator=g) * 0.5,
                     torch.randn(s.ffn_shift.shape, generator=g))


def assert_states_close(got: RWKVState, expect: RWKVState, **tol) -> None:
    """``torch.testing.assert_close`` on each of the three state tensors (``expect`` cast to float), naming
    the one that differs."""
    for name, g, e in zip(STATE_NAMES, got.tensors(), expect.tensors(), strict=True):
        torch.testing.assert_close(g, e.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")
