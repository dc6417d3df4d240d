"""``statetune serve``: the options, and start-up (model, states, engine thread, HTTP server).

The model is loaded once and the states of ``--states`` DIR are indexed (headers checked against it) before
the server listens; a state that does not fit is reported and skipped. See docs/serve.md.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from statetune.device import resolve_device
from statetune.errors import OptionError
from statetune.runtime import DTYPES, TOKENIZERS, check_choice

if TYPE_CHECKING:
    from statetune.serve.server import Server
    from statetune.serve.service import Service

__all__ = ["ServeOptions", "build_service", "make_server", "serve"]
log = logging.getLogger("statetune.serve")
API_KEY_ENV = "STATETUNE_API_KEY"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(kw_only=True)
class ServeOptions:
    """Serve a model and its tuned states over an OpenAI-compatible HTTP API (/v1/completions,
    /v1/chat/completions, streaming too): a request picks its state with "model": "<state name>".
    See docs/serve.md."""

    model: str = field(metadata=_h("Base model checkpoint (.pth or .safetensors)."))
    states: str | None = field(default=None, metadata=_h(
        "Directory of state files: each NAME.safetensors is served as model NAME (POST /v1/states/reload "
        "rescans it)."))
    model_name: str | None = field(default=None, metadata=_h(
        "Name of the base model alone (default: the model file's stem)."))
    host: str = field(default="127.0.0.1", metadata=_h("Address to listen on (default: loopback only)."))
    port: int = field(default=8000, metadata=_h("Port to listen on (0: any free port)."))
    api_key: str | None = field(default=None, metadata=_h(
        f"Require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} if set, else no key)."))
    max_tokens_limit: int = field(default=1024, metadata=_h(
        "Most tokens one answer may generate; a request's max_tokens is capped to it (and defaults to it)."))
    max_batch_size: int = field(default=32, metadata=_h(
        "Most sequences decoded together; further requests wait for a place."))
    max_prompt_tokens: int = field(default=4096, metadata=_h("Longest prompt accepted, in tokens."))
    prefill_tokens: int = field(default=4096, metadata=_h("Most tokens read in one prefill pass."))
    tokenizer: str = field(default="auto", metadata=_h("world, bytes, or auto (from the model's vocabulary "
                                                       "size)."))
    device: str = field(default="cpu", metadata=_h("Torch device (cpu, cuda, cuda:1)."))
    dtype: str = field(default="auto", metadata=_h("fp32, bf16, fp16, or auto (fp32 on CPU, bf16 on CUDA)."))
    grace_period: float = field(default=10.0, metadata=_h(
        "On shutdown, seconds requests in flight get to finish before they are cancelled."))
    access_log: bool = field(default=False, metadata=_h(
        "Log every HTTP request as one JSON line (route, status, duration, tokens, cache, time to first token)."))
    cache_mb: float = field(default=512.0, metadata=_h(
        "Memory for the prefix-state cache, in MiB (0: no cache): states after prompts and answers, so that a "
        "request starting with a cached prefix (a chat's history) reads only the rest."))
    cache_device: str | None = field(default=None, metadata=_h(
        "Where cached states are kept (default: the model's device; cpu keeps accelerator memory free)."))
    max_loaded_states: int = field(default=64, metadata=_h(
        "Most state files held in memory at once (least recently used first out); the others are read on "
        "first use."))
    playground: bool | None = field(default=None, metadata=_h(
        "Serve the playground page at / (default: on when listening on loopback only)."))

    def __post_init__(self) -> None:
        for name in ("max_tokens_limit", "max_batch_size", "max_prompt_tokens", "prefill_tokens",
                     "max_loaded_states"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise OptionError(f"--port: must be in 0..65535, got {self.port}")
        if not math.isfinite(self.cache_mb) or self.cache_mb < 0:
            raise OptionError(f"--cache-mb: must be a finite number, 0 or more, got {self.cache_mb}")
        if not math.isfinite(self.grace_period):
            raise OptionError(f"--grace-period: must be a finite number, got {self.grace_period}")
        if self.grace_period < 0:
            raise OptionError(f"--grace-period: must be 0 or more, got {self.grace_period}")
        check_choice("--tokenizer", self.tokenizer, TOKENIZERS)
        check_choice("--dtype", self.dtype, DTYPES)
        if self.model_name is not None and not self.model_name.strip():
            raise OptionError("--model-name: empty")
        if self.states is not None and not Path(self.states).is_dir():
            raise OptionError(f"--states: not a directory: {self.states}")

    @property
    def serves_playground(self) -> bool:
        return self.host in LOOPBACK if self.playground is None else self.playground

    @property
    def base_name(self) -> str:
        return self.model_name or Path(self.model).stem

    def key(self) -> str | None:
        """The API key: the flag, else the environment variable, else none."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


def build_service(opts: ServeOptions) -> Service:
    """Load the model and the states; returns the :class:`~statetune.serve.service.Service` (not started)."""
    import torch

    from statetune.model.checkpoint import load_model
    from statetune.runtime import pick_tokenizer, resolve_dtype
    from statetune.serve.batcher import Batcher
    from statetune.serve.cache import PrefixCache
    from statetune.serve.prompts import Limits
    from statetune.serve.registry import Registry
    from statetune.serve.service import Service

    model = load_model(opts.model, device=resolve_device(opts.device), dtype=resolve_dtype(opts.dtype, opts.device))
    tokenizer = pick_tokenizer(opts.tokenizer, {}, model.config.vocab_size)
    try:
        cache_device = torch.device(opts.cache_device) if opts.cache_device else model.device
    except RuntimeError as e:
        raise OptionError(f"--cache-device: not a torch device: {opts.cache_device!r} ({e})") from None
    cache = PrefixCache(int(opts.cache_mb * (1 << 20)), cache_device)
    registry = Registry(model, tokenizer, opts.base_name, opts.states, opts.max_loaded_states, on_drop=cache.drop)
    registry.reload()
    log.info("model %s (%s, %d layers, tokenizer %s) as %r", opts.model, model.config.version,
             model.config.n_layer, tokenizer.name, opts.base_name)
    batcher = Batcher(model, tokenizer, opts.max_batch_size, opts.prefill_tokens, cache)
    limits = Limits(opts.max_tokens_limit, opts.max_prompt_tokens, model.config.vocab_size)
    return Service(model, tokenizer, registry, batcher, limits)


def make_server(opts: ServeOptions, service: Service | None = None) -> Server:
    """The uvicorn server for ``opts`` (building the service unless given); ``run()`` it, or
    ``run(sockets=[...])`` on a socket bound already."""
    import uvicorn

    from statetune.serve.app import create_app
    from statetune.serve.server import Server

    service = service or build_service(opts)
    app = create_app(service, opts.key(), playground=opts.serves_playground, access_log=opts.access_log)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5, server_header=False)
    return Server(config, service, opts.grace_period)


def serve(opts: ServeOptions) -> int:
    """Run ``statetune serve`` until Ctrl-C or SIGTERM; returns the exit status."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise OptionError("statetune serve needs FastAPI and uvicorn: pip install 'statetune[serve]'") from None
    if opts.host not in LOOPBACK and opts.key() is None:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the "
                    "server (give --api-key or $%s)", opts.host, API_KEY_ENV)
    server = make_server(opts)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on, once it has shut down cleanly
        pass
    except (OSError, SystemExit) as e:  # uvicorn logs why it cannot listen, then exits
        if server.started:
            raise
        raise OptionError(f"--host/--port: cannot listen on {opts.host}:{opts.port}"
                          + (f": {e}" if isinstance(e, OSError) else " (see the error above)")) from None
    if server.started:
        log.info("stopped")
    return 0 if server.started else 1


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready TCP socket on ``host`` (port 0: a free one), for running a server in-process."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
