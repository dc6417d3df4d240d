"""The one-token WKV updates used when decoding, against the sequential reference at ``T = 1``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from statetune.ops.reference import wkv6_reference, wkv7_reference
from statetune.ops.step import wkv6_step, wkv7_step
from statetune.ops.wkv6 import wkv6
from statetune.ops.wkv7 import wkv7


def inputs7(dtype: torch.dtype, seed: int = 0, B: int = 3, H: int = 2, N: int = 8):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, 1, H, N, generator=g, dtype=dtype) for _ in range(3))
    w = -torch.exp(torch.empty(B, 1, H, N, dtype=dtype).uniform_(-8.0, 2.0, generator=g))
    kk = F.normalize(torch.randn(B, 1, H, N, generator=g, dtype=dtype), dim=-1)
    a, b = -kk, kk * torch.rand(B, 1, H, N, generator=g, dtype=dtype)
    state = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return r, w, k, v, a, b, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rwkv7_step_equals_reference(dtype):
    args = inputs7(dtype)
    y, s = wkv7_step(*args)
    y_ref, s_ref = wkv7_reference(*args)
    assert y.shape == y_ref.shape and s.shape == s_ref.shape and y.dtype == s.dtype == dtype
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
    y_auto, s_auto = wkv7(*args)  # dispatch takes the step at T = 1
    assert torch.equal(y_auto, y) and torch.equal(s_auto, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rwkv6_step_equals_reference(dtype):
    r, w, k, v, _, _, state = inputs7(dtype, seed=1)
    u = torch.randn(r.shape[2], r.shape[3], dtype=dtype, generator=torch.Generator().manual_seed(2))
    y, s = wkv6_step(r, w, k, v, u, state)
    y_ref, s_ref = wkv6_reference(r, w, k, v, u, state)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
    y_auto, s_auto = wkv6(r, w, k, v, u, state)
    assert torch.equal(y_auto, y) and torch.equal(s_auto, s)


def test_steps_are_differentiable_float64():
    args = [t.clone().requires_grad_(True) for t in inputs7(torch.float64, B=1, H=1, N=4)]
    assert torch.autograd.gradcheck(wkv7_step, args)
    r, w, k, v, _, _, state = args
    u = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(wkv6_step, (r, w, k, v, u, state))
