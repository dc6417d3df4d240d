"""``statetune serve``: the options, and a thin start-up over :mod:`statetune.serve.startup`."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from statetune.errors import OptionError
from statetune.options import flag, h
from statetune.runtime import STATE_SCALE_HELP, ModelOptions, check_state_scale
from statetune.serve import startup
from statetune.serve.fdlimits import ConnectionLimits, connection_limits
from statetune.serve.startup import bound_socket

if TYPE_CHECKING:
    from statetune.serve.server import Server
    from statetune.serve.service import Service

__all__ = ["ServeOptions", "bound_socket", "build_service", "make_server", "serve"]
log = logging.getLogger("statetune.serve")
API_KEY_ENV = "STATETUNE_API_KEY"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(kw_only=True)
class ServeOptions(ModelOptions):
    """Serve a model and its tuned states over an OpenAI-compatible HTTP API (/v1/completions,
    /v1/chat/completions, streaming too): a request picks its state with "model": "<state name>".
    See docs/serve.md."""

    states: str | None = field(default=None, metadata=h(
        "Directory of state files: each NAME.safetensors is served as model NAME (POST /v1/states/reload "
        "rescans it)."))
    state_scale: float = field(default=1.0, metadata=h(STATE_SCALE_HELP.replace("each loaded state file",
                                                                              "every state served but the base")))
    model_name: str | None = field(default=None, metadata=h(
        "Name of the base model alone (default: the model file's stem)."))
    host: str = field(default="127.0.0.1", metadata=h("Address to listen on (default: loopback only)."))
    port: int = field(default=8000, metadata=h("Port to listen on (0: any free port)."))
    api_key: str | None = field(default=None, metadata=h(
        f"Require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} if set, else no key)."))
    max_tokens_limit: int = field(default=1024, metadata=h(
        "Most tokens one answer may generate; a request's max_tokens is capped to it (and defaults to it)."))
    max_batch_size: int = field(default=32, metadata=h(
        "Most sequences decoded together; further requests wait for a place."))
    max_prompt_tokens: int = field(default=4096, metadata=h("Longest prompt accepted, in tokens."))
    prefill_tokens: int = field(default=4096, metadata=h("Most tokens read in one prefill pass."))
    grace_period: float = field(default=10.0, metadata=h(
        "On shutdown, seconds requests in flight get to finish before they are cancelled."))
    access_log: bool = field(default=False, metadata=h(
        "Log every HTTP request as one JSON line (route, status, duration, tokens, cache, time to first token)."))
    cache_mb: float = field(default=512.0, metadata=h(
        "Memory for the prefix-state cache, in MiB (0: no cache): states after prompts and answers, so that a "
        "request starting with a cached prefix (a chat's history) reads only the rest."))
    cache_device: str | None = field(default=None, metadata=h(
        "Where cached states are kept (default: the model's device; cpu keeps accelerator memory free)."))
    max_loaded_states: int = field(default=64, metadata=h(
        "Most state files held in memory at once (least recently used first out); the others are read on "
        "first use."))
    playground: bool | None = field(default=None, metadata=h(
        "Serve the playground page at / (default: on when listening on loopback only)."))
    batch_layout: bool = field(default=True, metadata=h(
        "On CPU, keep a second copy of the weights blocked for batched decode steps (about 1.7x faster steps "
        "of 8 sequences on a 0.1B model; costs the weights' memory once more: --no-batch-layout where memory "
        "is tight)."))
    max_connections: int | None = field(default=None, metadata=h(
        "Most connections open at once (default: 3/4 of the open-file limit, ulimit -n, at most 4096). At the "
        "cap a new connection closes the one idle longest; when all have a request in progress it gets 503."))
    header_timeout: float = field(default=10.0, metadata=h(
        "Seconds a connection gets to send a request's complete headers, and then its body; slower ones are closed."))
    keep_alive_timeout: float = field(default=5.0, metadata=h(
        "Seconds an idle connection is kept open between requests."))
    max_api_states: int = field(default=32, metadata=h(
        "Most state files POST /v1/states may write to --states DIR (\"persist\": true); 0: none."))
    # -- Ray: several replicas of the model, routed by state (statetune.serve.ray_app) --
    ray: bool = field(default=False, metadata=h(
        "Serve with Ray Serve: --replicas copies of the model, each request routed to a replica that has its "
        "state loaded (needs statetune[ray]; see docs/serve.md, 'More than one machine')."))
    replicas: int = field(default=1, metadata=h("With --ray: replicas of the model (each with --threads threads)."))
    ray_address: str | None = field(default=None, metadata=h(
        "With --ray: the Ray cluster to join (e.g. auto, or HOST:6379); default: start a local Ray instance, "
        "on loopback only, and stop it with the server."))
    ray_affinity: bool = field(default=True, metadata=h(
        "With --ray: route a state's requests to a replica that has it loaded (--no-ray-affinity: by load "
        "alone, for comparison)."))

    def check_ray_options(self) -> None:
        """Usage errors for the Ray flags: they need --ray, and --ray needs a states directory it can share."""
        if self.replicas < 1:
            raise OptionError(f"--replicas: must be at least 1, got {self.replicas}")
        if not self.ray:
            for name, default in (("replicas", 1), ("ray_address", None), ("ray_affinity", True)):
                if getattr(self, name) != default:
                    raise OptionError(f"{flag(name)}: only with --ray")

    def __post_init__(self) -> None:
        self.check_ray_options()
        for name in ("max_tokens_limit", "max_batch_size", "max_prompt_tokens", "prefill_tokens",
                     "max_loaded_states"):
            if getattr(self, name) < 1:
                raise OptionError(f"{flag(name)}: must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise OptionError(f"--port: must be in 0..65535, got {self.port}")
        if not math.isfinite(self.cache_mb) or self.cache_mb < 0:
            raise OptionError(f"--cache-mb: must be a finite number, 0 or more, got {self.cache_mb}")
        if not math.isfinite(self.grace_period):
            raise OptionError(f"--grace-period: must be a finite number, got {self.grace_period}")
        if self.grace_period < 0:
            raise OptionError(f"--grace-period: must be 0 or more, got {self.grace_period}")
        for name in ("header_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise OptionError(f"{flag(name)}: must be a finite number of seconds above 0, got {value}")
        if self.max_connections is not None and self.max_connections < 1:
            raise OptionError(f"--max-connections: must be at least 1, got {self.max_connections}")
        if self.max_api_states < 0:
            raise OptionError(f"--max-api-states: must be 0 or more, got {self.max_api_states}")
        self.connection_limits()  # the cap must leave files free under this process's open-file limit
        self.check_model_options()
        check_state_scale(self.state_scale)
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

    def connection_limits(self) -> ConnectionLimits:
        """The connection bounds these options ask for, checked against the open-file limit."""
        return connection_limits(self.max_connections, self.header_timeout, self.keep_alive_timeout)

    def key(self) -> str | None:
        """The API key: the flag, else the environment variable, else none."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


def build_service(opts: ServeOptions) -> Service:
    """The service these options describe (model loaded, states indexed), not started."""
    return startup.build_service(opts, states=opts.states, base_name=opts.base_name,
                                 max_loaded_states=opts.max_loaded_states, cache_mb=opts.cache_mb,
                                 cache_device=opts.cache_device, max_batch_size=opts.max_batch_size,
                                 prefill_tokens=opts.prefill_tokens, max_tokens_limit=opts.max_tokens_limit,
                                 max_prompt_tokens=opts.max_prompt_tokens,
                                 state_scale=opts.state_scale, batch_layout=opts.batch_layout)


def make_server(opts: ServeOptions, service: Service | None = None) -> Server:
    """The uvicorn server for ``opts`` (building the service unless given)."""
    return startup.make_server(service or build_service(opts), host=opts.host, port=opts.port, api_key=opts.key(),
                               playground=opts.serves_playground, access_log=opts.access_log,
                               grace_period=opts.grace_period, limits=opts.connection_limits(),
                               max_api_states=opts.max_api_states)


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
    if opts.ray:
        return serve_ray(opts)
    return startup.run_server(make_server(opts), opts.host, opts.port)


def serve_ray(opts: ServeOptions) -> int:
    """``serve --ray``: the same server as ``--replicas`` replicas on Ray (statetune.serve.ray_run)."""
    from statetune.serve.ray_run import check_ray, run_ray

    check_ray()
    from statetune.serve.ray_app import RayConfig

    model = {k: getattr(opts, k) for k in ("model", "tokenizer", "device", "dtype", "threads")}
    service = dict(states=str(Path(opts.states).resolve()) if opts.states else None, base_name=opts.base_name,
                   max_loaded_states=opts.max_loaded_states, cache_mb=opts.cache_mb, cache_device=opts.cache_device,
                   max_batch_size=opts.max_batch_size, prefill_tokens=opts.prefill_tokens,
                   max_tokens_limit=opts.max_tokens_limit, max_prompt_tokens=opts.max_prompt_tokens,
                   state_scale=opts.state_scale, batch_layout=opts.batch_layout)
    model["model"] = str(Path(opts.model).resolve())
    config = RayConfig(model=model, service=service, replicas=opts.replicas, api_key=opts.key(),
                       playground=opts.serves_playground, access_log=opts.access_log, affinity=opts.ray_affinity,
                       grace_period=opts.grace_period, max_api_states=opts.max_api_states)
    return run_ray(config, opts.host, opts.port, opts.ray_address)
