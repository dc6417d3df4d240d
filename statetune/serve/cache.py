"""The prefix-state cache: the state an RNN reached after a token prefix, so a later request that starts with
that prefix reads only the rest.

An RWKV model's state after a prefix is all it needs to continue, so caching it is exact: a request that
starts from a cached state answers as if it had read the whole prompt (greedy: the same tokens). Entries are
keyed by the served state's key (which changes when its file changes) and the token prefix; a lookup finds
the longest cached prefix of a prompt that leaves at least one token to read (the model must read a token to
predict the next one). Prefixes are found through rolling hashes of the prompt, computed once per lookup,
and confirmed token by token, so a hash collision can never serve a wrong state.

The cache is bounded in bytes (``--cache-mb``), least recently used first out, and counts hits, misses,
evictions and the prefill tokens it saved. States are kept on ``device`` (the model's, or ``cpu`` to keep
accelerator memory for decoding) and their bytes are what the budget counts.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from statetune.model.state import RWKVState

_MOD = (1 << 61) - 1
_BASE = 1_000_003


def prefix_hashes(tokens: list[int]) -> list[int]:
    """``h[k]`` is the rolling hash of ``tokens[:k]`` (``h[0]`` is the empty prefix's)."""
    h = [0] * (len(tokens) + 1)
    acc = 0
    for k, t in enumerate(tokens):
        acc = (acc * _BASE + t + 1) % _MOD
        h[k + 1] = acc
    return h


def state_bytes(state: RWKVState) -> int:
    return sum(t.numel() * t.element_size() for t in state.tensors())


@dataclass
class CacheStats:
    """Counters since start: lookups that found a prefix (``hits``) or not, entries evicted, tokens saved."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    saved_tokens: int = 0
    stored: int = 0


@dataclass
class _Item:
    tokens: tuple[int, ...]
    state: RWKVState
    nbytes: int


class PrefixCache:
    """States after token prefixes, per served state, within ``budget_bytes`` (LRU); safe across threads."""

    def __init__(self, budget_bytes: int, device: torch.device | str | None = None) -> None:
        self.budget = max(0, int(budget_bytes))
        self.device = None if device is None else torch.device(device)
        self.stats = CacheStats()
        self.nbytes = 0
        self._items: OrderedDict[tuple[str, int, int], _Item] = OrderedDict()
        self._lengths: dict[str, Counter[int]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, key: str, prompt: list[int]) -> tuple[int, RWKVState | None]:
        """The longest cached prefix of ``prompt`` (shorter than the prompt) for the state ``key``:
        ``(its length, the state after it)``, or ``(0, None)``. Counts a hit or a miss."""
        if not self.enabled:
            return 0, None
        with self._lock:
            lengths = sorted((n for n in self._lengths.get(key, ()) if n < len(prompt)), reverse=True)
            if lengths:
                hashes = prefix_hashes(prompt[:lengths[0]])
                for n in lengths:
                    item = self._items.get((key, n, hashes[n]))
                    if item is not None and list(item.tokens) == prompt[:n]:
                        self._items.move_to_end((key, n, hashes[n]))
                        self.stats.hits += 1
                        self.stats.saved_tokens += n
                        return n, item.state
            self.stats.misses += 1
            return 0, None

    def put(self, key: str, tokens: list[int], state: RWKVState) -> None:
        """Keep ``state``, the state after ``tokens`` read from the state ``key`` (batch 1)."""
        if not self.enabled or not tokens:
            return
        state = state if self.device is None else state.to(self.device)
        nbytes = state_bytes(state)
        if nbytes > self.budget:
            return
        ident = (key, len(tokens), prefix_hashes(tokens)[-1])
        with self._lock:
            old = self._items.pop(ident, None)
            if old is not None:
                self._forget(ident, old)
            self._items[ident] = _Item(tuple(tokens), state, nbytes)
            self._lengths.setdefault(key, Counter())[len(tokens)] += 1
            self.nbytes += nbytes
            self.stats.stored += 1
            while self.nbytes > self.budget:
                victim, item = self._items.popitem(last=False)
                self._forget(victim, item)
                self.stats.evictions += 1

    def drop(self, key: str) -> None:
        """Forget every prefix of the state ``key`` (its file changed or went away)."""
        with self._lock:
            for ident in [i for i in self._items if i[0] == key]:
                self._forget(ident, self._items.pop(ident))

    def _forget(self, ident: tuple[str, int, int], item: _Item) -> None:
        self.nbytes -= item.nbytes
        lengths = self._lengths[ident[0]]
        lengths[ident[1]] -= 1
        if lengths[ident[1]] <= 0:
            del lengths[ident[1]]
        if not lengths:
            del self._lengths[ident[0]]
