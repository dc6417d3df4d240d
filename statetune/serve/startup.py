"""Start-up of the server: the model and the states of a directory loaded into a
:class:`~statetune.serve.service.Service`, and the uvicorn server around it.

The model is loaded once and the states of the directory are indexed (headers checked against it) before
the server listens; a state that does not fit is reported and skipped. See docs/serve.md.
"""

from __future__ import annotations

import functools
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from statetune.errors import OptionError
from statetune.runtime import ModelOptions
from statetune.serve.fdlimits import ConnectionLimits, connection_limits

if TYPE_CHECKING:
    from statetune.serve.server import Server
    from statetune.serve.service import Service

log = logging.getLogger("statetune.serve")


def build_service(runtime: ModelOptions, *, states: str | Path | None = None, base_name: str,
                  max_loaded_states: int = 64, cache_mb: float = 512.0, cache_device: str | None = None,
                  max_batch_size: int = 32, prefill_tokens: int = 4096, max_tokens_limit: int = 1024,
                  max_prompt_tokens: int = 4096, state_scale: float = 1.0, batch_layout: bool = True) -> Service:
    """Load the model and index the states; returns the :class:`~statetune.serve.service.Service` (not
    started). ``cache_mb`` is the prefix-state cache's memory (0: none), kept on ``cache_device`` (default:
    the model's device); ``state_scale`` multiplies every state read from ``states``; ``batch_layout`` keeps
    a blocked copy of the weights for batched decode steps on CPU (``RWKVBase.use_batch_layout``)."""
    import torch

    from statetune.runtime import pick_tokenizer
    from statetune.serve.batcher import Batcher
    from statetune.serve.cache import PrefixCache
    from statetune.serve.prompts import Limits
    from statetune.serve.registry import Registry
    from statetune.serve.service import Service

    model = runtime.load_model()
    if batch_layout:
        model.use_batch_layout(max_batch_size)  # batched decode steps: weights blocked once for oneDNN on CPU
    tokenizer = pick_tokenizer(runtime.tokenizer, {}, model.config.vocab_size)
    try:
        device = torch.device(cache_device) if cache_device else model.device
    except RuntimeError as e:
        raise OptionError(f"--cache-device: not a torch device: {cache_device!r} ({e})") from None
    cache = PrefixCache(int(cache_mb * (1 << 20)), device)
    registry = Registry(model, tokenizer, base_name, states, max_loaded_states, on_drop=cache.drop,
                        state_scale=state_scale)
    registry.reload()
    log.info("model %s (%s, %d layers, tokenizer %s) as %r", runtime.model, model.config.version,
             model.config.n_layer, tokenizer.name, base_name)
    batcher = Batcher(model, tokenizer, max_batch_size, prefill_tokens, cache)
    limits = Limits(max_tokens_limit, max_prompt_tokens, model.config.vocab_size)
    return Service(model, tokenizer, registry, batcher, limits)


def make_server(service: Service, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                playground: bool = False, access_log: bool = False, grace_period: float = 10.0,
                limits: ConnectionLimits | None = None, max_api_states: int = 32) -> Server:
    """The uvicorn server for ``service``; ``run()`` it, or ``run(sockets=[...])`` on a socket bound already.

    Connections are bounded by ``limits`` (default: from the open-file limit, see
    :mod:`statetune.serve.fdlimits`), through the h11 protocol of :mod:`statetune.serve.connections`."""
    import uvicorn

    from statetune.serve.app import create_app
    from statetune.serve.connections import MAX_HEADER_BYTES, BoundedH11Protocol
    from statetune.serve.server import Server

    limits = limits or connection_limits(None)
    app = create_app(service, api_key, playground=playground, access_log=access_log, max_api_states=max_api_states)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5, server_header=False,
                            http=functools.partial(BoundedH11Protocol, limits=limits), backlog=limits.backlog,
                            timeout_keep_alive=limits.keep_alive, h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    return Server(config, service, grace_period)


def run_server(server: Server, host: str, port: int) -> int:
    """Run ``server`` until Ctrl-C or SIGTERM; returns 130 once it has stopped on one (the CLI makes that 143
    after SIGTERM), 0 when it stopped on its own, 1 when it never started."""
    interrupted = False
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal it shut down on, once it has shut down cleanly
        interrupted = True
    except (OSError, SystemExit) as e:  # uvicorn logs why it cannot listen, then exits
        if server.started:
            raise
        raise OptionError(f"--host/--port: cannot listen on {host}:{port}"
                          + (f": {e}" if isinstance(e, OSError) else " (see the error above)")) from None
    if server.started:
        log.info("stopped")
    if not server.started:
        return 1
    return 130 if interrupted else 0


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready TCP socket on ``host`` (port 0: a free one), for running a server in-process."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
