"""One answer of one or more choices: every prompt of a request, ``n`` times, is a sequence of the batch.

The choices of a request decode together (they join the running batch like any other requests); a whole
answer waits for all of them, a stream interleaves their chunks, each tagged with its ``index``. A choice
that cannot finish ends the whole answer (the others are cancelled): a 4xx/5xx body, or in a stream an
``error`` event and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from statetune.infer.engine import Completion, Delta
from statetune.infer.sampling import MAX_SEED, SamplingParams
from statetune.serve.accesslog import request_info
from statetune.serve.batcher import Scoring
from statetune.serve.errors import ApiError
from statetune.serve.logprobs import CompletionLogprobs, chat_logprobs
from statetune.serve.registry import Entry
from statetune.serve.responses import DONE, Reply, sse
from statetune.serve.service import Service

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Choice:
    """One sequence of an answer: its prompt, sampling, what is scored, and (completions' ``echo``) the
    prompt's text, written before the answer."""

    index: int
    prompt: list[int]
    params: SamplingParams
    scoring: Scoring
    echo: str | None = None


@dataclass(frozen=True)
class Wanted:
    """How scores are written: ``top`` alternatives per token, or ``top`` None for no ``logprobs``."""

    top: int | None = None


def expand(prompts: list[list[int]], params: SamplingParams, n: int, scoring: Scoring,
           echo: list[str] | None = None) -> list[Choice]:
    """``n`` choices per prompt, indexed prompt-major as OpenAI does; with a seed, sample ``i`` of a prompt
    uses ``seed + i`` so that the samples differ and the answer stays reproducible."""
    out = []
    for k, prompt in enumerate(prompts):
        for i in range(n):
            p = params if params.seed is None or i == 0 else dataclasses.replace(params,
                                                                                  seed=(params.seed + i) % MAX_SEED)
            out.append(Choice(k * n + i, prompt, p, scoring, None if echo is None else echo[k]))
    return out


async def answer(service: Service, reply: Reply, entry: Entry, choices: list[Choice], wanted: Wanted,
                 stream: bool | None, include_usage: bool, request: Request) -> Response:
    """Decode every choice and answer: one JSON body, or (``stream``) server-sent events."""
    if service.draining:
        raise ApiError(503, "the server is shutting down", code="shutting_down")
    await service.start_state(entry)  # a state that cannot be read is this request's 500, before any stream
    if stream:
        return StreamingResponse(_stream(service, reply, entry, choices, wanted, include_usage, request),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    tasks = [asyncio.create_task(_collect(service, entry, c, request)) for c in choices]
    try:
        done = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    if any(d is None for d in done):  # the client went away; nobody reads this
        return Response(status_code=499)
    tokens = sum(len(d.tokens) for d in done)
    request_info(request)["completion_tokens"] = tokens
    body = [reply.choice(c.index, *_whole(reply, service, c, d, wanted)) for c, d in zip(choices, done, strict=True)]
    return JSONResponse(reply.body(body, tokens))


async def _collect(service: Service, entry: Entry, c: Choice, request: Request) -> Completion | None:
    done, info = None, request_info(request)
    async with aclosing(service.generate(c.prompt, entry, c.params, request, info=info, scoring=c.scoring)) as ds:
        async for d in ds:
            done = d.completion or done
    return done


def _whole(reply: Reply, service: Service, c: Choice, done: Completion, wanted: Wanted
           ) -> tuple[str, str, dict | None]:
    """A finished choice's text, finish reason and scores."""
    tok = service.tokenizer
    if reply.chat:
        logprobs = None if wanted.top is None else chat_logprobs(tok, done.scores or [], wanted.top)
        return done.text.lstrip(" "), done.finish_reason, logprobs
    text = (c.echo or "") + done.text
    if wanted.top is None:
        return text, done.finish_reason, None
    writer = CompletionLogprobs(tok, wanted.top)
    scores = (done.prompt_scores or []) if c.echo is not None else []
    parts = [writer.part(scores), writer.part(done.scores or [])]
    return text, done.finish_reason, {k: parts[0][k] + parts[1][k] for k in parts[0]}


async def _stream(service: Service, reply: Reply, entry: Entry, choices: list[Choice], wanted: Wanted,
                  include_usage: bool, request: Request) -> AsyncIterator[bytes]:
    """The interleaved chunks of every choice, then usage and ``[DONE]``; the first failure ends it."""
    info, used = request_info(request), [0] * len(choices)
    gens = [_choice_events(service, reply, entry, c, wanted, request, used) for c in choices]
    try:
        async for chunk in _merged(gens):
            yield sse(chunk)
    except ApiError as e:
        info["error"] = e.message
        yield sse(e.body())
        yield DONE
        return
    except _Gone:
        return
    info["completion_tokens"] = sum(used)
    if include_usage:
        yield sse(reply.usage_chunk(sum(used)))
    yield DONE


class _Gone(Exception):
    """A choice's sequence ended without finishing: the client went away."""


async def _choice_events(service: Service, reply: Reply, entry: Entry, c: Choice, wanted: Wanted, request: Request,
                         used: list[int]) -> AsyncIterator[dict[str, Any]]:
    """The chunks of one choice; a chat reply's leading space is dropped, as ``statetune chat`` does."""
    tok = service.tokenizer
    writer = CompletionLogprobs(tok, wanted.top or 0) if not reply.chat and wanted.top is not None else None
    if reply.chat:
        yield reply.chunk("", role=True, index=c.index)
    started, finished = not reply.chat, False
    async with aclosing(service.generate(c.prompt, entry, c.params, request, info=request_info(request),
                                         scoring=c.scoring)) as deltas:
        async for d in deltas:
            if c.echo is not None and d.prompt_scores is not None:  # the echoed prompt comes first
                logprobs = None if writer is None else writer.part(d.prompt_scores)
                yield reply.chunk(c.echo, index=c.index, logprobs=logprobs)
            text = d.text
            if not started and text:
                text = text.lstrip(" ")
                started = bool(text)
            logprobs = _chunk_logprobs(tok, d, writer, wanted, reply.chat)
            if d.completion is not None:
                finished = True
                used[c.index] = len(d.completion.tokens)
                yield reply.chunk((text or None) if reply.chat else text, d.finish_reason, index=c.index,
                                  logprobs=logprobs)
            elif text or logprobs is not None:
                yield reply.chunk(text, index=c.index, logprobs=logprobs)
    if not finished:
        raise _Gone()


def _chunk_logprobs(tok, d: Delta, writer: CompletionLogprobs | None, wanted: Wanted, chat: bool) -> dict | None:
    if wanted.top is None or d.score is None:
        return None
    return chat_logprobs(tok, [d.score], wanted.top) if chat else writer.part([d.score])


_END = object()


async def _merged(gens: list[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """The items of several async iterators as they come; an exception of one ends all (and is raised)."""
    if len(gens) == 1:
        async with aclosing(gens[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(gen: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async with aclosing(gen) as g:
                async for item in g:
                    await queue.put(item)
            await queue.put(_END)
        except Exception as e:  # handed to the reader, which ends the stream
            await queue.put(e)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
