"""What the routes share: the model, the registry, the batcher, the limits, and the life of a request.

:meth:`Service.generate` is the one way a request gets tokens: it submits the sequence, yields its deltas,
and in every way out (end, error, client gone, server stopping) leaves the engine clean. A client that
disconnects is noticed while it waits (a watcher listens for ``http.disconnect``), not only when a write
fails, so a queued or slow request is dropped from the batch at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

from starlette.requests import Request

from statetune.errors import StatetuneError, state_source
from statetune.infer.engine import Delta
from statetune.infer.sampling import SamplingParams
from statetune.model.state import RWKVState
from statetune.serve.batcher import Batcher, Handle, Scoring
from statetune.serve.errors import ApiError, EngineFailure, ShuttingDown
from statetune.serve.metrics import Metrics
from statetune.serve.prompts import Limits
from statetune.serve.registry import Entry, Registry
from statetune.tokenizer import Tokenizer

log = logging.getLogger("statetune.serve")
_GONE = object()  # queued when the client disconnects


@dataclass
class Service:
    """The server's shared objects; ``draining`` refuses new requests while the server stops."""

    model: object
    tokenizer: Tokenizer
    registry: Registry
    batcher: Batcher
    limits: Limits
    draining: bool = False
    inflight: int = 0
    metrics: Metrics | None = None

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = Metrics(self)

    def lookup(self, name: str) -> Entry:
        """The entry called ``name``; a 404 listing the names otherwise. Names are never paths."""
        entry = self.registry.get(name) if isinstance(name, str) else None
        if entry is None:
            names = self.registry.names()
            raise ApiError(404, f"unknown model {name!r}; available: {', '.join(names)}", "model",
                           code="model_not_found", available=names)
        return entry

    async def start_state(self, entry: Entry) -> RWKVState:
        """The start state of ``entry``, read from its file (off the event loop) on first use."""
        try:
            state = self.registry.peek(entry)  # in memory: no file to read, no thread needed
            return state if state is not None else await asyncio.to_thread(self.registry.state, entry)
        except StatetuneError as e:
            raise ApiError(500, f"the state {entry.name!r} cannot be used, and is no longer served: "
                           f"{str(e).removeprefix(f'{entry.path}: ')}", "model", code="state_unreadable") from None

    async def generate(self, prompt: list[int], entry: Entry | None, params: SamplingParams, request: Request,
                       capture: bool = False, info: dict | None = None, scoring: Scoring | None = None
                       ) -> AsyncIterator[Delta]:
        """Decode one sequence from ``entry``'s state, yielding its deltas until the one with a ``finish_reason``.

        Raises :class:`ApiError` when it cannot finish (shutdown, a failure of this sequence); simply ends
        early when the client disconnects. Use it inside ``contextlib.aclosing`` so that leaving early
        cancels it. ``entry`` None starts from zeros. ``capture`` keeps the final state in the last delta's
        completion; ``scoring`` asks for log-probabilities (in the deltas and the completion); ``info`` (the
        access log's fields of this request) gets the prompt tokens the cache saved and the time to first token.
        """
        if self.draining:
            raise ShuttingDown()
        state = self.model.zero_state(1) if entry is None else await self.start_state(entry)
        handle = self.batcher.submit(prompt, state, params, None if entry is None else entry.key, capture, scoring,
                                     self._source(entry))
        del state  # the handle holds it until the engine has read the prompt
        self.inflight += 1
        watcher = asyncio.create_task(_disconnected(request))
        watcher.add_done_callback(partial(_on_disconnect, handle))
        finished, last, m = False, None, self.metrics
        m.prompt_tokens.inc(len(prompt))
        try:
            while True:
                item = await handle.queue.get()
                if item is _GONE:
                    return
                if isinstance(item, ApiError):
                    finished = True
                    if isinstance(item, EngineFailure):
                        m.failures.inc()
                    raise item
                now = time.perf_counter()
                if last is None:
                    m.ttft.observe(now - handle.submitted)
                    if info is not None:
                        info.update(cached_tokens=handle.cached, ttft_ms=round((now - handle.submitted) * 1e3, 1))
                else:
                    m.token_latency.observe(now - last)
                last = now
                if item.token >= 0:
                    m.generated.inc()
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            watcher.cancel()
            self.inflight -= 1
            if not finished:
                self.batcher.cancel(handle)

    def _source(self, entry: Entry | None) -> str:
        """How an error names the state a request starts from (the served name and ``serve --state-scale``)."""
        if entry is None:
            return state_source(None)
        scaled = "" if entry.origin == "base" else f" at serve --state-scale {self.registry.state_scale:g}"
        return f"state {entry.name!r}{scaled}"

    async def drain(self, grace: float, forced: Callable[[], bool] = lambda: False) -> None:
        """Stop taking requests, give those in flight ``grace`` seconds, then end the rest with a 503."""
        self.draining = True
        if self.inflight:
            log.info("waiting up to %.0f s for %d request(s) in flight", grace, self.inflight)
        deadline = time.monotonic() + grace
        while self.inflight and time.monotonic() < deadline and not forced():
            await asyncio.sleep(0.05)
        if self.inflight:
            log.warning("cancelling %d request(s) still in flight", self.inflight)
        self.batcher.cancel_all()
        deadline = time.monotonic() + 5
        while self.inflight and time.monotonic() < deadline:  # let them write their last chunk
            await asyncio.sleep(0.02)


async def _disconnected(request: Request) -> None:
    """Return when the client has disconnected (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _on_disconnect(handle: Handle, task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is None:
        handle.queue.put_nowait(_GONE)
