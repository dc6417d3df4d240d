"""The one thread that owns the decoding engine and multiplexes every request onto it.

:class:`~statetune.infer.engine.Engine` is not thread-safe and its steps are long, blocking tensor work, so
it lives on a thread of its own and the event loop never touches it. Requests reach the thread through a
queue of commands (add, cancel, cancel all, stop); between two decoding steps the thread applies them, so a
new request joins the running batch at the next step (continuous batching) and a cancelled one leaves it.
What a step produces goes back to each request's ``asyncio.Queue`` with one ``call_soon_threadsafe`` per
step and event loop.

The prefix-state cache lives on this thread too: a new sequence starts from the longest cached prefix of its
prompt (and reads only the rest), and a finished one leaves two states behind, the one before its prompt's
last token and the one before its last sampled token, which is where a chat's next turn (the history, the
answer, a new message) starts. A sequence that fails alone (its state drives the model out of range) ends
with its own 500 while the rest of the batch goes on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from statetune.infer.engine import Completion, Delta, Engine
from statetune.infer.sampling import SamplingParams
from statetune.model.state import RWKVState
from statetune.serve.cache import PrefixCache
from statetune.serve.errors import ApiError, EngineFailure, ShuttingDown
from statetune.tokenizer import Tokenizer

log = logging.getLogger("statetune.serve")


@dataclass(frozen=True)
class Scoring:
    """What a request asks to be scored: ``logprobs`` alternatives for each sampled token (None: no
    scores), ``prompt`` alternatives for each prompt token (None: the prompt is not scored; it then skips
    the prefix cache, whose states carry no logits), ``only``: score the prompt and sample nothing."""

    logprobs: int | None = None
    prompt: int | None = None
    only: bool = False


@dataclass(eq=False)
class Handle:
    """One request's sequence: what to decode, and the queue its :class:`Delta`s (or an error) arrive on.

    ``key`` names the start state's version for the prefix cache (None: not cached); ``capture`` asks for
    the final state in the :class:`Completion`; ``source`` names the start state in errors. Only the engine
    thread sets ``seq_id`` and ``cached`` (the prompt tokens a cached state saved); ``cancelled`` is set by the
    request's side.
    """

    prompt: list[int]
    state: RWKVState | None
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    key: str | None = None
    capture: bool = False
    scoring: Scoring = Scoring()
    source: str | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int | None = None
    cancelled: bool = False
    cached: int = 0
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """Runs ``Engine.step`` on a background thread for every submitted :class:`Handle`.

    ``submit`` and ``cancel`` may be called from any thread (normally the event loop's); results arrive on
    each handle's queue as :class:`Delta` objects, the last one with a ``finish_reason``, or as one
    :class:`ApiError` when the request cannot finish (engine failure, shutdown).
    """

    def __init__(self, model, tokenizer: Tokenizer, max_batch_size: int = 32, prefill_tokens: int = 4096,
                 cache: PrefixCache | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.prefill_tokens = max_batch_size, prefill_tokens
        self.cache = cache if cache is not None else PrefixCache(0)
        self.engine = self._new_engine()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._handles: dict[int, Handle] = {}
        self._closed: ApiError | None = None
        self._thread = threading.Thread(target=self._run, name="statetune-engine", daemon=True)
        self.steps = 0

    def _new_engine(self) -> Engine:
        return Engine(self.model, self.tokenizer, max_batch_size=self.max_batch_size,
                      prefill_tokens=self.prefill_tokens, isolate_failures=True)

    # -- the request side --------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def submit(self, prompt: list[int], state: RWKVState, params: SamplingParams, key: str | None = None,
               capture: bool = False, scoring: Scoring | None = None, source: str | None = None) -> Handle:
        """Queue a sequence for the running event loop's request; it joins the batch at the next step."""
        handle = Handle(prompt, state, params, asyncio.get_running_loop(), key, capture, scoring or Scoring(),
                        source)
        self._inbox.put(("add", handle))
        return handle

    def cancel(self, handle: Handle) -> None:
        """Drop a request's sequence (its client is gone): no more events are sent to its queue."""
        handle.cancelled = True
        self._inbox.put(("cancel", handle))

    def cancel_all(self, error: ApiError | None = None) -> None:
        """End every request with ``error`` (default: shutting down) and refuse the ones submitted later."""
        self._inbox.put(("cancel_all", error or ShuttingDown()))

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever is left and end the thread."""
        if self._thread.is_alive():
            self.cancel_all()
            self._inbox.put(("stop", None))
            self._thread.join(timeout)

    @property
    def active(self) -> int:
        """Requests the engine holds (decoding or waiting for a place in the batch)."""
        return len(self._handles)

    @property
    def waiting(self) -> int:
        """Requests waiting for a place in the batch."""
        return self.engine.num_waiting

    # -- the engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            commands = [] if len(self.engine) else [self._inbox.get()]  # idle: sleep until there is work
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            out: list[tuple[Handle, Any]] = []
            for kind, arg in commands:
                if kind == "stop":
                    self._post(out)
                    return
                self._apply(kind, arg, out)
            if len(self.engine):
                self._step(out)
            self._post(out)

    def _apply(self, kind: str, arg: Any, out: list[tuple[Handle, Any]]) -> None:
        if kind == "add":
            handle: Handle = arg
            if handle.cancelled:
                return
            if self._closed is not None:
                out.append((handle, self._closed))
                return
            cached, start, sc = 0, handle.state, handle.scoring
            if handle.key is not None and sc.prompt is None:
                cached, hit = self.cache.lookup(handle.key, handle.prompt)
                start = hit if hit is not None else start
            caching = self.cache.enabled and handle.key is not None
            try:
                handle.seq_id = self.engine.add(handle.prompt[cached:], start, handle.params,
                                                keep_state=caching or handle.capture, keep_prompt_state=caching,
                                                logprobs=sc.logprobs, prompt_logprobs=sc.prompt, score_only=sc.only,
                                                source=handle.source)
                handle.cached, handle.state = cached, None  # the engine holds it until it has read the prompt
            except ValueError as e:  # validated by the request already; this is a last line of defence
                out.append((handle, ApiError(400, str(e))))
                return
            self._handles[handle.seq_id] = handle
        elif kind == "cancel":
            handle = arg
            if handle.seq_id is not None and self._handles.pop(handle.seq_id, None) is not None:
                self.engine.cancel(handle.seq_id)
        elif kind == "cancel_all":
            self._closed = arg
            for seq_id, handle in list(self._handles.items()):
                self.engine.cancel(seq_id)
                out.append((handle, arg))
            self._handles.clear()

    def _step(self, out: list[tuple[Handle, Any]]) -> None:
        try:
            deltas: list[Delta] = self.engine.step()
        except Exception as e:  # keep serving: fail this batch's requests, start a fresh engine
            log.exception("decoding step failed; cancelling %d request(s)", len(self._handles))
            error = EngineFailure(f"{type(e).__name__}: {e}")
            out.extend((h, error) for h in self._handles.values())
            self._handles.clear()
            self.engine = self._new_engine()
            return
        self.steps += 1
        for d in deltas:
            handle = self._handles.pop(d.seq_id) if d.finished else self._handles.get(d.seq_id)
            if handle is None:
                continue
            if d.error is not None:
                log.warning("a sequence failed alone (the rest of the batch goes on): %s", d.error)
                out.append((handle, EngineFailure(d.error)))
                continue
            if d.completion is not None:
                self._remember(handle, d.completion)
            out.append((handle, d))

    def _remember(self, handle: Handle, done: Completion) -> None:
        """Cache the states a finished sequence leaves; keep them in the completion only for a capture."""
        if handle.key is not None:
            if done.prompt_state is not None:
                self.cache.put(handle.key, handle.prompt[:-1], done.prompt_state)
            if done.state is not None:
                self.cache.put(handle.key, handle.prompt + done.tokens[:-1], done.state)
        if not handle.capture:
            done.state = None
        done.prompt_state = None

    @staticmethod
    def _post(out: list[tuple[Handle, Any]]) -> None:
        """Hand the step's results to the event loops: one thread-safe call per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Handle, Any]]] = defaultdict(list)
        for handle, item in out:
            by_loop[handle.loop].append((handle, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


def _deliver(items: list[tuple[Handle, Any]]) -> None:
    for handle, item in items:
        if not handle.cancelled:
            handle.queue.put_nowait(item)
