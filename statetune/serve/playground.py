"""The playground page at ``/``: pick a state, chat or complete, watch the answer stream, see the state's
metadata. Plain HTML, CSS and JavaScript from ``statetune/serve/static`` (shipped as package data), served
by the server itself and talking to its own API, so there is nothing to build and nothing else to run.

The page itself needs no API key (it holds no data); the API calls it makes do, when the server has one.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

from statetune.serve.errors import ApiError

STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def _read(name: str) -> bytes:
    return files("statetune.serve").joinpath("static", name).read_bytes()


def add_playground(app: FastAPI) -> None:
    """Serve the page at ``/`` and its two files under ``/playground/``."""

    @app.get("/")
    async def page() -> Response:
        return Response(_read("index.html"), media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})

    @app.get("/playground/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:  # a fixed list: the name is never joined to a path
            raise ApiError(404, f"no such playground file: {name[:60]!r}")
        return Response(_read(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})
