"""The HTTP routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/v1/states/reload``,
``/health`` and ``/metrics``, as a FastAPI app over a :class:`~statetune.serve.service.Service` (the states
API, the tokenizer endpoints and the playground page add theirs from ``states_api``, ``tokenize_api`` and
``playground``; answers of several choices are built by ``choices``).

Handlers only translate: a request body becomes prompt ids and sampling parameters (``prompts``), the
service decodes, and the deltas become an OpenAI body or a stream of server-sent events (``responses``).
Every error a client can cause is an OpenAI-style error body with a 4xx status; a stream that cannot finish
ends with an ``error`` event and ``data: [DONE]``, never by hanging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from statetune._version import __version__
from statetune.serve import prompts as P
from statetune.serve.accesslog import AccessLog, request_info
from statetune.serve.batcher import Scoring
from statetune.serve.choices import Wanted, answer, expand
from statetune.serve.errors import ApiError, error_body
from statetune.serve.guard import Guard
from statetune.serve.metrics import CONTENT_TYPE_LATEST
from statetune.serve.playground import add_playground
from statetune.serve.responses import Reply, model_card
from statetune.serve.schemas import ChatRequest, CompletionRequest
from statetune.serve.service import Service
from statetune.serve.states_api import add_state_routes
from statetune.serve.tokenize_api import add_tokenizer_routes

log = logging.getLogger("statetune.serve")


def create_app(service: Service, api_key: str | None = None, max_body: int = 4 << 20, playground: bool = False,
               access_log: bool = False, max_api_states: int = 32) -> AccessLog:
    """The ASGI application: the routes behind the API-key and body-size guard, behind the access log (which
    counts every answer in ``/metrics`` and, with ``access_log``, logs it as one JSON line); at most
    ``max_api_states`` state files may be written over the API.

    The batcher thread starts with the app and stops (cancelling what is left) when the app shuts down.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        try:
            yield
        finally:
            service.draining = True
            await asyncio.to_thread(service.batcher.stop)

    app = FastAPI(title="statetune", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service
    _errors(app)
    _routes(app, service)
    add_state_routes(app, service, max_api_states)
    add_tokenizer_routes(app, service)
    if playground:
        add_playground(app)
    return AccessLog(Guard(app, api_key, max_body), service.metrics, access_log)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(e.errors())
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(e).__name__, e, exc_info=e)
        return JSONResponse(error_body(500, "internal server error"), status_code=500)


def describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A one-line message naming the field of the first validation error (and how many more there are)."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if tuple(first.get("loc", ())) == ("body",) and isinstance(first.get("input"), bytes | str):
        return "the body must be a JSON object, sent with 'Content-Type: application/json'", None
    # union members appear in the location as type names ('str', 'list[int]'): keep only real fields
    loc = [str(p) if isinstance(p, int) else p for p in first.get("loc", ()) if p != "body"]
    fields = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")))]
    where = ".".join(str(p) for p in fields) or "body"
    message = f"{where}: {first.get('msg', 'invalid value')}"
    if "input" in first and first.get("type") != "missing":
        message += f", got {_short(first['input'])}"
    return message, fields[0] if fields else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _routes(app: FastAPI, service: Service) -> None:
    registry, tokenizer, limits = service.registry, service.tokenizer, service.limits

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness and load: 200 while serving, 503 while shutting down."""
        body = {"status": "stopping" if service.draining else "ok", "models": len(registry.names()),
                "in_flight": service.inflight, "decoding": service.batcher.active}
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        """The counters, gauges and histograms in the Prometheus text format."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(e, registry.base_name) for e in registry.entries()]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        return model_card(service.lookup(name), registry.base_name)

    @app.post("/v1/states/reload")
    async def reload() -> dict[str, Any]:
        """Rescan the states directory: new files become available, removed ones go, changed ones are re-read."""
        report = await asyncio.to_thread(registry.reload)
        return {"object": "reload", "models": registry.names(), **report.as_dict()}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        P.check_unsupported(body)
        entry = service.lookup(body.model)
        prompts = P.completion_prompts(body, entry, tokenizer, limits)
        strings, stop_ids = P.completion_stops(body, entry, tokenizer)
        params = P.sampling_params(body, strings, stop_ids, limits)
        scoring = Scoring(logprobs=body.logprobs, prompt=body.logprobs or 0 if body.echo else None,
                          only=P.score_only(body))
        echo = [tokenizer.decode(p) for p in prompts] if body.echo else None
        choices = expand(prompts, params, body.n or 1, scoring, echo)
        n_prompt = sum(len(p) for p in prompts)
        request_info(request).update(model=entry.name, prompt_tokens=n_prompt)
        return await answer(service, Reply(False, entry.name, n_prompt), entry, choices, Wanted(body.logprobs),
                            body.stream, _include_usage(body), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        P.check_unsupported(body)
        entry = service.lookup(body.model)
        ids = P.chat_prompt_ids(body, tokenizer, limits)
        strings, stop_ids = P.chat_stops(body, tokenizer)
        wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = P.sampling_params(body, strings, stop_ids, limits, wanted)
        top = (body.top_logprobs or 0) if body.logprobs else None
        choices = expand([ids], params, body.n or 1, Scoring(logprobs=top))
        request_info(request).update(model=entry.name, prompt_tokens=len(ids))
        return await answer(service, Reply(True, entry.name, len(ids)), entry, choices, Wanted(top), body.stream,
                            _include_usage(body), request)


def _include_usage(body: CompletionRequest | ChatRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)
