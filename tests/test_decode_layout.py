"""Batched decode paths: oneDNN-blocked weight copies and WKV states written in place, against the plain path."""

from __future__ import annotations

import pytest
import torch

from statetune.infer.sampling import RowSampler, SamplingParams, sample
from statetune.model.checkpoint import load_model
from statetune.model.linear import Linear, blocked_linear_available
from statetune.model.state import RWKVState

needs_onednn = pytest.mark.skipif(not blocked_linear_available(), reason="this torch build has no oneDNN")


def decode(model, state: RWKVState, steps: int, seed: int = 0) -> tuple[list[torch.Tensor], RWKVState]:
    """Logits of ``steps`` single-token steps from ``state`` (tokens drawn from ``seed``), and the last state."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.randint(0, model.config.vocab_size, (state.batch_size, 1), generator=g)
            logits, state = model(ids, state)
            out.append(logits)
    return out, state


def prompt_state(model, B: int) -> RWKVState:
    with torch.no_grad():
        _, st = model(torch.randint(0, model.config.vocab_size, (B, 5), generator=torch.Generator().manual_seed(1)))
    return st


@needs_onednn
@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
@pytest.mark.parametrize("B", [1, 4])
def test_blocked_weights_decode_like_the_checkpoint_layout(tiny_ckpt, version, B):
    plain, blocked = load_model(tiny_ckpt(version)), load_model(tiny_ckpt(version))
    assert blocked.use_batch_layout(rows=B)
    assert all(m.blocked is not None for m in blocked.modules() if isinstance(m, Linear))
    st = prompt_state(plain, B)
    want, want_state = decode(plain, st, 4)
    got, got_state = decode(blocked, st, 4)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_state.tensors(), want_state.tensors(), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert plain.fingerprint() == blocked.fingerprint()
    assert blocked.state_dict().keys() == plain.state_dict().keys()


@needs_onednn
def test_the_blocked_copy_is_what_single_token_steps_run(tiny_ckpt):
    model = load_model(tiny_ckpt())
    model.use_batch_layout()
    h = torch.randn(3, 1, model.config.n_embd)
    with torch.no_grad():
        want = model.head(h)
        model.head.blocked = torch.ops.mkldnn._reorder_linear_weight(2 * model.head.weight, 8)
        torch.testing.assert_close(model.head(h), 2 * want)
        torch.testing.assert_close(model.head(h.expand(3, 2, -1)), want.expand(3, 2, -1))  # T > 1: the weight
        torch.testing.assert_close(model.head(h[:1]), want[:1])  # one row: the weight
    with torch.enable_grad():
        torch.testing.assert_close(model.head(h), want)  # recording gradients: the weight


@needs_onednn
def test_a_changed_weight_is_not_shadowed_by_a_stale_copy(tiny_ckpt):
    model = load_model(tiny_ckpt())
    model.use_batch_layout()
    h = torch.randn(2, 1, model.config.n_embd)
    with torch.no_grad():
        model.head.weight.mul_(3)  # in place: the copy made before is stale
        torch.testing.assert_close(model.head(h), torch.nn.functional.linear(h, model.head.weight))
        model.use_decode_layout()  # a new weight tensor
        torch.testing.assert_close(model.head(h), torch.nn.functional.linear(h, model.head.weight))


def test_batch_layout_is_refused_where_it_does_not_apply(tiny_ckpt):
    model = load_model(tiny_ckpt(), dtype=torch.float64)
    assert not model.use_batch_layout()
    assert all(m.blocked is None for m in model.modules() if isinstance(m, Linear))


@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("T", [1, 3])
def test_states_written_in_place_equal_the_stacked_ones(tiny_ckpt, version, impl, T):
    model = load_model(tiny_ckpt(version))
    model.set_wkv_impl(impl)
    st = prompt_state(model, 2)
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # each layer writes into the result
        logits, new = model(ids, st)
    with torch.enable_grad():  # per-layer states stacked (what training runs)
        ref_logits, ref = model(ids, st)
    torch.testing.assert_close(logits, ref_logits)
    for a, b in zip(new.tensors(), ref.tensors(), strict=True):
        torch.testing.assert_close(a, b)
    assert not any(t.requires_grad for t in ref.tensors())


def test_greedy_sampling_leaves_the_logits_alone():
    logits = torch.randn(3, 50)
    before = logits.clone()
    rows = [RowSampler(SamplingParams(temperature=0)) for _ in range(3)]
    assert sample(logits, rows) == before.argmax(-1).tolist()
    pen = [RowSampler(SamplingParams(temperature=0, presence_penalty=100.0)) for _ in range(3)]
    for r, t in zip(pen, before.argmax(-1).tolist(), strict=True):
        r.observe(t)
    assert sample(logits, pen) != before.argmax(-1).tolist()  # penalties still apply
    assert torch.equal(logits, before)
