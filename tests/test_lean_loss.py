"""The lean training forward gives the plain forward's loss and initial-state gradient."""

from __future__ import annotations

import pytest
import torch

import statetune
from statetune.model.state import RWKVState
from statetune.objective import masked_lm_loss, plain_lm_loss


@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_lean_equals_plain(tiny_ckpt, version, chunk):
    model = statetune.load_model(tiny_ckpt(version))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (2, 12), generator=g)
    mask = torch.rand(2, 12, generator=g) > 0.5
    grads, losses = [], []
    for lean in (True, False):
        s0 = model.zero_state(1)
        wkv = (torch.randn(s0.wkv.shape, generator=torch.Generator().manual_seed(1)) * 0.3).requires_grad_()
        state = RWKVState(s0.att_shift, wkv, s0.ffn_shift)
        if lean:
            loss, n, _ = masked_lm_loss(model, tokens, mask, state, activation_checkpoint=True, chunk=chunk)
        else:
            loss, n = plain_lm_loss(model, tokens, mask, state)
        loss.backward()
        grads.append(wkv.grad)
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert not any(p.grad is not None for p in model.parameters())
