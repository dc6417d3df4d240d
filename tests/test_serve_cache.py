"""The prefix-state cache and per-sequence failures, below HTTP: the cache itself, then the batcher thread.

A cached state must change nothing: several chat turns, several states, batch members hitting and missing,
must give token for token what an engine without any cache gives. An engine that isolates failures must end
a sequence whose state drives the model out of range alone, the others unchanged.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from serve_helpers import random_state

import statetune
from statetune.errors import NonFiniteError
from statetune.infer.engine import ERROR, Engine
from statetune.infer.sampling import SamplingParams
from statetune.model.state import RWKVState
from statetune.prompts import chat_prompt
from statetune.serve.batcher import Batcher
from statetune.serve.cache import PrefixCache, prefix_hashes, state_bytes
from statetune.tokenizer import get_tokenizer

BYTES = get_tokenizer("bytes")


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return statetune.load_model(tiny_ckpt("rwkv7"))


def tagged(model, tag: float) -> RWKVState:
    s = model.zero_state(1)
    return RWKVState(s.att_shift + tag, s.wkv, s.ffn_shift)


def test_longest_prefix_that_leaves_a_token_to_read(model):
    cache = PrefixCache(1 << 20)
    cache.put("a", [1, 2], tagged(model, 2))
    cache.put("a", [1, 2, 3, 4], tagged(model, 4))
    cache.put("b", [1, 2, 3], tagged(model, 3))
    n, st = cache.lookup("a", [1, 2, 3, 4, 5])
    assert n == 4 and st.att_shift[0, 0, 0].item() == 4
    n, st = cache.lookup("a", [1, 2, 3, 4])  # the whole prompt cannot be skipped: one token must be read
    assert n == 2 and st.att_shift[0, 0, 0].item() == 2
    assert cache.lookup("a", [1, 3, 3, 4, 5]) == (0, None)  # same length, other tokens
    assert cache.lookup("c", [1, 2, 3, 4, 5]) == (0, None)  # another state's prefixes are not this one's
    assert (cache.stats.hits, cache.stats.misses, cache.stats.saved_tokens) == (2, 2, 6)


def test_hash_collisions_are_confirmed_token_by_token(model):
    cache = PrefixCache(1 << 20)
    cache.put("a", [7, 8], tagged(model, 1))
    ident = next(iter(cache._items))
    item = cache._items.pop(ident)
    forged = ("a", 2, prefix_hashes([9, 9])[-1])  # pretend [9, 9] hashed like [7, 8]
    cache._items[forged] = item
    assert cache.lookup("a", [9, 9, 1]) == (0, None)


def test_lru_within_the_byte_budget_and_drop(model):
    size = state_bytes(model.zero_state(1))
    cache = PrefixCache(3 * size)
    for k in range(5):
        cache.put("a", [k, 1], tagged(model, k))
    assert len(cache) == 3 and cache.nbytes == 3 * size and cache.stats.evictions == 2
    assert cache.lookup("a", [0, 1, 5]) == (0, None)  # the oldest went first
    assert cache.lookup("a", [2, 1, 5])[0] == 2
    cache.put("a", [5, 1], tagged(model, 5))  # [2, 1] was used last: [3, 1] goes
    assert cache.lookup("a", [3, 1, 5]) == (0, None) and cache.lookup("a", [2, 1, 5])[0] == 2
    cache.drop("a")
    assert len(cache) == 0 and cache.nbytes == 0
    assert PrefixCache(0).lookup("a", [1, 2]) == (0, None)  # disabled: nothing stored or found
    tiny = PrefixCache(size - 1)
    tiny.put("a", [1, 2], tagged(model, 1))  # a state bigger than the whole budget is not kept
    assert len(tiny) == 0


def reference(model, prompt: list[int], state: RWKVState, max_tokens: int) -> list[int]:
    """Greedy tokens from an engine without any cache."""
    engine = Engine(model, BYTES)
    engine.add(prompt, state, SamplingParams(temperature=0, max_tokens=max_tokens, stop=["\n\n"], stop_token_ids=[0]))
    done = None
    while len(engine):
        done = next((d.completion for d in engine.step() if d.completion), done)
    return done.tokens


async def through(batcher: Batcher, jobs: list[tuple[list[int], RWKVState, str]], max_tokens: int):
    """Submit every job at once; returns each one's completion."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=["\n\n"], stop_token_ids=[0])
    handles = [batcher.submit(p, s, params, key) for p, s, key in jobs]
    out = []
    for h in handles:
        while True:
            d = await h.queue.get()
            if d.finished:
                out.append((d.completion, h.cached))
                break
    return out


def test_chat_turns_through_the_cache_equal_the_uncached_engine(model):
    """Three users, two states, four turns, all in one batch each turn: identical tokens, growing hits."""
    states = {"s1": random_state(model, 1), "s2": random_state(model, 2)}
    users = [("s1", "Hello!"), ("s2", "Hi there."), ("s1", "Tell me more.")]
    histories: list[list[dict]] = [[] for _ in users]
    cache = PrefixCache(8 << 20)
    batcher = Batcher(model, BYTES, max_batch_size=8, cache=cache)
    batcher.start()
    try:
        for turn in range(4):
            jobs = []
            for (key, opener), hist in zip(users, histories, strict=True):
                hist.append({"role": "user", "content": f"{opener} Turn {turn}."})
                jobs.append((BYTES.encode(chat_prompt(hist)), states[key], key))
            results = asyncio.run(through(batcher, jobs, 12))
            for (prompt, state, _), (done, cached), hist in zip(jobs, results, histories, strict=True):
                assert done.tokens == reference(model, prompt, state, 12)
                if turn:  # the history was read before: only the new message (and the answer's end) is read now
                    assert cached >= len(BYTES.encode(chat_prompt(hist[:-1]))) - 1
                hist.append({"role": "assistant", "content": done.text.lstrip(" ")})
    finally:
        batcher.stop()
    assert cache.stats.hits >= 9 and cache.stats.saved_tokens > 0


def test_a_changed_state_never_uses_the_old_one_s_prefixes(model):
    cache = PrefixCache(8 << 20)
    batcher = Batcher(model, BYTES, cache=cache)
    batcher.start()
    try:
        prompt = BYTES.encode("The same prompt, twice.")
        old, new = random_state(model, 3), random_state(model, 4)
        (first, _), = asyncio.run(through(batcher, [(prompt, old, "x#1")], 10))
        (second, cached), = asyncio.run(through(batcher, [(prompt, new, "x#2")], 10))
        assert cached == 0 and second.tokens == reference(model, prompt, new, 10)
        (again, cached), = asyncio.run(through(batcher, [(prompt, old, "x#1")], 10))
        assert cached == len(prompt) - 1 and again.tokens == first.tokens
    finally:
        batcher.stop()


def broken_state(model) -> RWKVState:
    """Finite values so large that the model's output overflows to NaN or infinity."""
    s = model.zero_state(1)
    return RWKVState(*(torch.full_like(t, 3e38) for t in s.tensors()))


def test_an_isolating_engine_fails_one_sequence_alone(model):
    good = [random_state(model, k) for k in range(3)]
    prompts = [BYTES.encode(t) for t in ("abc", "abc", "xyz!")]
    engine = Engine(model, BYTES, isolate_failures=True)
    params = SamplingParams(temperature=0, max_tokens=15, stop_token_ids=[])
    ids = [engine.add(p, s, params) for p, s in zip(prompts, good, strict=True)]
    bad = engine.add(BYTES.encode("abc"), broken_state(model), params)  # same length: shares a prefill pass
    done, errors = {}, {}
    while len(engine):
        for d in engine.step():
            if d.finish_reason == ERROR:
                errors[d.seq_id] = d.error
            elif d.completion:
                done[d.seq_id] = d.completion.tokens
    assert list(errors) == [bad] and "not finite" in errors[bad]
    for seq_id, p, s in zip(ids, prompts, good, strict=True):
        e = Engine(model, BYTES)
        e.add(p, s, params)
        alone = None
        while len(e):
            alone = next((d.completion.tokens for d in e.step() if d.completion), alone)
        assert done[seq_id] == alone


def test_the_default_engine_raises_instead_of_error_deltas(model):
    """Without isolation a non-finite output is no error delta (nor a sampled token): it raises."""
    engine = Engine(model, BYTES)
    engine.add(BYTES.encode("abc"), broken_state(model), SamplingParams(temperature=0, max_tokens=3),
               source="state broken.safetensors at --state-scale 1")
    with pytest.raises(NonFiniteError, match="broken.safetensors"):
        engine.step()
