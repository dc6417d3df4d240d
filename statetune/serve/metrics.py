"""``GET /metrics``: the server's counters in the Prometheus text format, through ``prometheus_client``.

Request counts and latencies are recorded as they happen (``Metrics.request``, ``first_token``...); the
numbers other parts already keep (the prefix cache's hits, the loaded states, the queue) are read when the
page is scraped, by a collector, so they are never counted twice. Each server has a registry of its own
(not ``prometheus_client``'s global one), so several servers in one process do not mix their numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """The server's metrics; ``service`` is read at scrape time (cache, registry, batcher)."""

    def __init__(self, service: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("statetune_requests", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=r)
        self.generated = Counter("statetune_generated_tokens", "Tokens generated.", registry=r)
        self.prompt_tokens = Counter("statetune_prompt_tokens", "Prompt tokens of generation requests (read or "
                                     "taken from the prefix cache).", registry=r)
        self.failures = Counter("statetune_generation_failures", "Generation requests that failed alone in "
                                "the engine.", registry=r)
        self.ttft = Histogram("statetune_time_to_first_token_seconds", "From a generation request's submission "
                              "to its first token.", buckets=TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("statetune_inter_token_latency_seconds", "Between two tokens of one "
                                       "answer.", buckets=TOKEN_BUCKETS, registry=r)
        self.service = service
        if service is not None:
            r.register(_Live(service))

    def render(self) -> bytes:
        """The page: every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class _Live:
    """A collector of the values other parts keep: read, never copied, at each scrape."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        s = self.service
        stats = s.batcher.cache.stats
        counters: list[tuple[str, str, Callable[[], float]]] = [
            ("statetune_cache_hits", "Generation requests that started from a cached prefix state.",
             lambda: stats.hits),
            ("statetune_cache_misses", "Generation requests that found no cached prefix state.",
             lambda: stats.misses),
            ("statetune_cache_evictions", "Prefix states evicted to stay within --cache-mb.",
             lambda: stats.evictions),
            ("statetune_prefill_tokens_saved", "Prompt tokens not read because a cached prefix state had them.",
             lambda: stats.saved_tokens),
            ("statetune_state_loads", "State files read into memory (first use, or again after eviction).",
             lambda: s.registry.loads),
            ("statetune_state_evictions", "Loaded states evicted to stay within --max-loaded-states.",
             lambda: s.registry.evictions),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value())
        gauges: list[tuple[str, str, Callable[[], float]]] = [
            ("statetune_cache_bytes", "Bytes of prefix states held by the cache.", lambda: s.batcher.cache.nbytes),
            ("statetune_cache_budget_bytes", "The cache's budget (--cache-mb).", lambda: s.batcher.cache.budget),
            ("statetune_cache_entries", "Prefix states held by the cache.", lambda: len(s.batcher.cache)),
            ("statetune_loaded_states", "States whose tensors are in memory.", lambda: s.registry.loaded),
            ("statetune_served_states", "Names that can be requested (base model included).",
             lambda: len(s.registry.names())),
            ("statetune_queue_length", "Sequences waiting for a place in the batch.", lambda: s.batcher.waiting),
            ("statetune_requests_in_flight", "Generation requests being answered.", lambda: s.inflight),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value())
