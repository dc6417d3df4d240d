"""statetune's RWKV-7 and RWKV-6 against the official ``rwkv`` package, on tiny official-format files."""

from __future__ import annotations

import pytest
import torch
from reference_rwkv import from_reference_state, reference_model, to_reference_state
from state_compare import assert_states_close, random_state

import statetune

pytest.importorskip("rwkv")
TOL = dict(atol=1e-4, rtol=0)


@pytest.mark.parametrize("version,dtype", [("rwkv7", torch.float32), ("rwkv7", torch.bfloat16),
                                           ("rwkv6", torch.float32)])
@pytest.mark.parametrize("init", ["zeros", "random"])
def test_logits_and_state_match_reference(official_ckpt, version, dtype, init):
    path = official_ckpt(version, dtype)
    ours = statetune.load_model(path)
    ref = reference_model(path, version)
    tokens = torch.randint(0, 65536, (3, 11), generator=torch.Generator().manual_seed(3))
    state = ours.zero_state(3) if init == "zeros" else random_state(ours, 3, seed=4)

    logits, new_state = ours(tokens, state)
    for b in range(3):
        ref_logits, ref_state = ref.forward(tokens[b].tolist(), to_reference_state(state, b, version),
                                            full_output=True)
        torch.testing.assert_close(logits[b], ref_logits.float(), **TOL)
        assert_states_close(new_state.select([b]), from_reference_state(ref_state, version), **TOL)


@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_token_by_token_matches_reference_single_step(official_ckpt, version):
    path = official_ckpt(version)
    ours = statetune.load_model(path)
    ref = reference_model(path, version)
    tokens = [5, 65535, 17, 300, 9]
    state, ref_state = None, None
    for t in tokens:
        logits, state = ours(torch.tensor([[t]]), state)
        ref_logits, ref_state = ref.forward([t], ref_state)
        torch.testing.assert_close(logits[0, 0], ref_logits.float(), **TOL)


@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_sequence_equals_token_by_token_and_batch_equals_single(official_ckpt, version):
    model = statetune.load_model(official_ckpt(version))
    tokens = torch.randint(0, 65536, (3, 9), generator=torch.Generator().manual_seed(5))
    state0 = random_state(model, 3, seed=6)
    logits, final = model(tokens, state0)
    step_state, steps = state0, []
    for t in range(tokens.shape[1]):
        lg, step_state = model(tokens[:, t:t + 1], step_state)
        steps.append(lg)
    torch.testing.assert_close(torch.cat(steps, 1), logits, **TOL)
    for a, b in zip(final.tensors(), step_state.tensors(), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for b in range(3):
        lg_b, st_b = model(tokens[b:b + 1], state0.select([b]))
        torch.testing.assert_close(lg_b[0], logits[b], **TOL)
        torch.testing.assert_close(st_b.wkv, final.select([b]).wkv, **TOL)


def test_caller_state_is_not_modified(official_ckpt):
    model = statetune.load_model(official_ckpt("rwkv7"))
    state = random_state(model, 2, seed=7)
    before = state.clone()
    model(torch.tensor([[1, 2, 3], [4, 5, 6]]), state)
    for a, b in zip(state.tensors(), before.tensors(), strict=True):
        assert torch.equal(a, b)
