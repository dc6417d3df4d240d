"""``GET /v1/states``, ``POST /v1/states`` and ``DELETE /v1/states/NAME``: list, create and remove states.

``POST`` reads a text (or token ids) from a served state, or from zeros, as ``statetune state capture`` does,
and serves the state reached as a new name: in memory, or with ``"persist": true`` written to the states
directory too. A name is checked (letters, digits, ``.``, ``_``, ``-``; it starts with a letter or digit; at
most 64 characters) before anything else, so it can never be a path; the file it is written to is the name
plus ``.safetensors``, inside ``--states`` DIR and nowhere else, and an existing file is never overwritten;
at most ``--max-api-states`` files are written this way. Only states created this way can be deleted: those
kept in memory, and the files the server's own :class:`~statetune.serve.ledger.Ledger` records as written by
it, unchanged since (never by what a file's metadata says). Like every ``/v1`` route these need the API key
when one is set.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from statetune.infer.sampling import SamplingParams
from statetune.serve.accesslog import request_info
from statetune.serve.errors import ApiError
from statetune.serve.ledger import Ledger
from statetune.serve.prompts import encode_text
from statetune.serve.registry import SUFFIX, Entry
from statetune.serve.schemas import _Strict
from statetune.serve.service import Service

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Names Windows gives to devices, with any extension (``CON.safetensors`` cannot be created there), so a
#: states directory copied to Windows (RWKV-Runner's home) keeps every file
RESERVED = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?", re.IGNORECASE)
INHERITED = ("prompt_template", "prompt_template_no_input", "stop", "data_format", "eos")


class CreateState(_Strict):
    """The body of ``POST /v1/states``."""

    name: str
    text: str | None = None
    tokens: list[int] | None = None
    source: str | None = Field(default=None, alias="from")
    persist: bool = False


def check_name(name: str) -> str:
    """``name`` if it is a valid state name; a 400 naming the field otherwise."""
    if not NAME.fullmatch(name) or name.endswith((SUFFIX, ".")) or RESERVED.fullmatch(name):
        raise ApiError(400, f"name: a state name is 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                       f"letter or digit, not ending in '.' or {SUFFIX}, and not a device name of Windows "
                       f"(CON, NUL, COM1, ...), got {name[:80]!r}", "name", code="invalid_name")
    return name


def check_new_name(name: str, names: list[str]) -> None:
    """A 409 when ``name`` is taken by one of ``names``, or by one that differs only in case (their files
    would be one file on a case-insensitive file system)."""
    folded = name.casefold()
    same = next((n for n in names if n.casefold() == folded), None)
    if same is not None:
        what = "exists already" if same == name else f"differs only in case from the state {same!r}"
        raise ApiError(409, f"name: a state called {name!r} {what}", "name", code="state_exists")


def describe(entry: Entry, service: Service, ledger: Ledger | None = None) -> dict[str, Any]:
    reg = service.registry
    return {"id": entry.name, "object": "state", "origin": entry.origin, "deletable": deletable(entry, ledger),
            "token_shift": entry.has_shift, "file": entry.path.name if entry.path else None,
            "loaded": reg.is_loaded(entry)}


def deletable(entry: Entry, ledger: Ledger | None, digest: bool = False) -> bool:
    """Created over the API: kept in memory, or a file the ledger says this server wrote (``digest``: its
    contents checked too, as before deleting it)."""
    return entry.deletable or (ledger is not None and ledger.owns(entry.name, entry.path, digest))


def add_state_routes(app: FastAPI, service: Service, max_api_states: int = 32) -> None:
    registry, tokenizer, limits = service.registry, service.tokenizer, service.limits
    ledger = Ledger(registry.states_dir) if registry.states_dir is not None else None

    @app.get("/v1/states")
    async def list_states() -> dict[str, Any]:
        """Every served state (where it comes from, whether it is in memory) and the files skipped."""
        return {"object": "list", "data": [describe(e, service, ledger) for e in registry.entries()],
                "skipped": registry.skipped, "max_loaded_states": registry.max_loaded}

    creating = asyncio.Lock()  # one create or delete at a time: a name is checked and taken in one step

    @app.post("/v1/states")
    async def create(body: CreateState, request: Request) -> JSONResponse:
        async with creating:
            return await _create(body, request)

    async def _create(body: CreateState, request: Request) -> JSONResponse:
        name = check_name(body.name)
        check_new_name(name, [e.name for e in registry.entries()])
        if (body.text is None) == (body.tokens is None):
            raise ApiError(400, "text, tokens: give exactly one of them (the text to read into the state)", "text")
        if body.text is not None:
            ids = encode_text(tokenizer, body.text, "text")
        else:
            ids = list(body.tokens)
            bad = [t for t in ids if not 0 <= t < limits.vocab_size]
            if bad:
                raise ApiError(400, f"tokens: token id {bad[0]} is outside the vocabulary "
                               f"(0..{limits.vocab_size - 1})", "tokens")
        if not ids:
            raise ApiError(400, "text: empty; give at least one token to read", "text")
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"text: {len(ids)} tokens; this server reads at most {limits.max_prompt_tokens} "
                           "(--max-prompt-tokens)", "text")
        source = None if body.source is None else service.lookup(body.source)
        path = None
        if body.persist:
            if registry.states_dir is None:
                raise ApiError(400, "persist: this server has no --states directory to write to", "persist")
            path = registry.states_dir / f"{name}{SUFFIX}"
            if path.parent.resolve() != registry.states_dir.resolve() or path.exists():
                raise ApiError(409, f"name: the file {path.name} exists already in the states directory", "name",
                               code="state_exists")
            if ledger.count() >= max_api_states:
                raise ApiError(403, f"persist: this server writes at most {max_api_states} state files over the "
                               "API (--max-api-states); delete some, or create without \"persist\"", "persist",
                               code="state_quota_exceeded")
        if path is None and sum(e.origin == "api" for e in registry.entries()) >= registry.max_loaded:
            raise ApiError(409, f"at most {registry.max_loaded} states can be kept in memory (--max-loaded-states); "
                           "delete some, or create with \"persist\": true", code="too_many_states")
        request_info(request).update(model=name, prompt_tokens=len(ids))
        state = await _capture(service, ids, source, request)
        meta = {k: source.metadata[k] for k in INHERITED if source is not None and k in source.metadata}
        meta.update(tokenizer=tokenizer.name, created_by="api", captured_tokens=len(ids),
                    source_state=None if source is None else source.name)
        if body.text is not None:
            meta["captured_prompt"] = body.text
        if path is not None:
            if not await asyncio.to_thread(_persist, path, state, service.model, meta):
                raise ApiError(409, f"name: the file {path.name} exists already in the states directory", "name",
                               code="state_exists")
            ledger.record(name, path)
        try:
            entry = registry.add(name, state, meta, path)
        except ValueError as e:
            raise ApiError(409, f"name: {e}", "name", code="state_exists") from None
        return JSONResponse({**describe(entry, service, ledger), "tokens": len(ids), "persisted": path is not None},
                            status_code=201)

    @app.delete("/v1/states/{name}")
    async def delete(name: str) -> dict[str, Any]:
        async with creating:
            entry = service.lookup(name)
            if not await asyncio.to_thread(deletable, entry, ledger, True):
                raise ApiError(403, f"{name!r} was not created over the API by this server, or its file has changed "
                               "since; only such states can be deleted (remove its file and reload instead)", "name",
                               code="not_deletable")
            await asyncio.to_thread(registry.remove, entry)
            if ledger is not None:
                ledger.forget(name)
            return {"id": name, "object": "state", "deleted": True}


def _persist(path, state, model, meta: dict[str, Any]) -> bool:
    """Write a new state file; False when one appeared since the name was checked (another server sharing
    the states directory made it). Under a lock beside the file, so two servers never both write one name."""
    from statetune.locking import lock_beside, waiting
    from statetune.tuning.statefile import save_state

    with waiting(lock_beside(path)):
        if path.exists():
            return False
        save_state(path, state, model, meta, True)
        return True


async def _capture(service: Service, ids: list[int], source: Entry | None, request: Request):
    """The state after reading ``ids`` from ``source`` (None: zeros), on the engine thread."""
    params = SamplingParams(temperature=0, max_tokens=1, stop=[], stop_token_ids=[])
    done = None
    async for d in service.generate(ids, source, params, request, capture=True):
        done = d.completion or done
    if done is None or done.state is None:
        raise ApiError(499, "the client went away")
    return done.state
