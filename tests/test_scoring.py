"""Log-probabilities of prompt and sampled tokens: they are the model's distribution, the same numbers the
masked loss of ``statetune eval`` sums, read in chunks or through the engine alike."""

from __future__ import annotations

import math

import pytest
import torch

import statetune
from statetune.infer.engine import Engine
from statetune.infer.sampling import SamplingParams
from statetune.infer.scoring import score_prompt
from statetune.model.state import RWKVState
from statetune.objective import masked_lm_loss
from statetune.tokenizer import get_tokenizer


def random_state(model, seed: int) -> RWKVState:
    g = torch.Generator().manual_seed(seed)
    s = model.zero_state(1)
    return RWKVState(*(torch.randn(t.shape, generator=g) * 0.5 for t in (s.att_shift, s.wkv, s.ffn_shift)))


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return statetune.load_model(tiny_ckpt("rwkv7"))


PROMPT = [5, 17, 200, 3, 99, 42, 7, 150, 150, 12, 1, 250]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 256])
def test_summed_logprobs_of_a_continuation_are_minus_the_masked_loss(model, with_state, chunk):
    state = random_state(model, 3) if with_state else None
    scores, _, _ = score_prompt(model, PROMPT, state, top=0, chunk=chunk)
    assert scores[0].logprob is None and [s.token for s in scores] == PROMPT
    ctx = 5  # the continuation is PROMPT[ctx:]
    mask = torch.tensor([[0] * ctx + [1] * (len(PROMPT) - ctx)])
    loss, n, _ = masked_lm_loss(model, torch.tensor([PROMPT]), mask, state)
    assert n == len(PROMPT) - ctx
    total = sum(s.logprob for s in scores[ctx:])
    assert math.isclose(total, -float(loss), rel_tol=1e-5)


def test_top_alternatives_are_sorted_and_hold_the_argmax(model):
    scores, last, state = score_prompt(model, PROMPT, random_state(model, 1), top=4)
    assert scores[0].top == []
    for s in scores[1:]:
        assert len(s.top) == 4
        values = [lp for _, lp in s.top]
        assert values == sorted(values, reverse=True)
        assert s.logprob <= values[0] + 1e-6
        assert all(lp <= 0 for lp in values)
    full, _ = model(torch.tensor([PROMPT]), random_state(model, 1))
    torch.testing.assert_close(last, full[0, -1:])
    assert state.batch_size == 1


def test_engine_scores_sampled_and_prompt_tokens_consistently(model):
    tok = get_tokenizer("bytes")
    state = random_state(model, 2)
    engine = Engine(model, tok, max_batch_size=4)
    greedy = SamplingParams(temperature=0, max_tokens=6)
    a = engine.add(PROMPT, state, greedy, logprobs=2)
    b = engine.add(PROMPT[:7], state, greedy, prompt_logprobs=3, logprobs=0)
    c = engine.add(PROMPT, state, greedy, prompt_logprobs=1, score_only=True)
    done = {}
    while len(done) < 3:
        for d in engine.step():
            if d.finished:
                done[d.seq_id] = d.completion
    # a: each sampled token's score is the argmax (greedy) and equals scoring the whole text afterwards
    gen = done[a].tokens
    assert [s.token for s in done[a].scores] == gen
    assert all(s.top[0][0] == s.token for s in done[a].scores)
    rescored, _, _ = score_prompt(model, PROMPT + gen, state)
    for s, r in zip(done[a].scores, rescored[len(PROMPT):], strict=True):
        assert math.isclose(s.logprob, r.logprob, rel_tol=1e-5, abs_tol=1e-6)
    # b: prompt scored and then decoded from the same state as a plain read would give
    assert [s.token for s in done[b].prompt_scores] == PROMPT[:7]
    assert done[b].scores[0].top == []
    # c: scored without sampling, the same numbers as the direct call
    assert done[c].tokens == [] and done[c].finish_reason == "length"
    direct, _, _ = score_prompt(model, PROMPT, state, top=1)
    for s, r in zip(done[c].prompt_scores, direct, strict=True):
        assert s.token == r.token and (s.logprob is None) == (r.logprob is None)
        if s.logprob is not None:
            assert math.isclose(s.logprob, r.logprob, rel_tol=1e-6)
