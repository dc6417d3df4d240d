"""``statetune serve --ray``: the same server as N replicas on a Ray cluster, routed by state.

Two Ray Serve deployments:

- :class:`StateReplica`, N replicas, each a plain class holding one
  :class:`~statetune.serve.service.Service` (the model, its own prefix-state cache and state LRU, the engine
  thread) and the unchanged FastAPI app, which answers the requests it is handed in-process
  (:func:`~statetune.serve.relay.run_asgi`), so every route, error and stream is the single-process one.
- :class:`Front`, the HTTP ingress: behind the API-key and body-size guard it reads a request, takes the
  state it names (the body's ``"model"``) and hands it to a replica with that state as Ray Serve's
  *multiplexed model id*: Ray routes it to a replica that has the state loaded (``@serve.multiplexed``,
  an LRU as large as ``--max-loaded-states``), so a state's requests, and its cached prefixes, stay on one
  replica. ``affinity=False`` routes by load alone (the benchmark's comparison).

States come from a directory every replica sees; each replica rescans it when it changes (and once on a
request for a name it does not know), so a state written by ``POST /v1/states`` on one replica is served by
all. A replica that dies loses only the requests it was answering: those not yet answered at all are sent
once more to another replica, streams already under way end with an error event; Ray starts a new replica.

``serve run statetune.serve.ray_app:build_app model=M.pth states=DIR replicas=2`` runs it under Ray's own
CLI (see docs/serve.md); ``statetune serve --ray`` starts it through :mod:`statetune.serve.ray_run`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import threading
import time
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.handle import DeploymentHandle

from statetune.errors import OptionError
from statetune.serve import relay
from statetune.serve.guard import Guard

log = logging.getLogger("statetune.serve")
APP_NAME = "statetune"
# answered again by another replica when the first died before answering anything: no side effects
RETRIED = {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}


@dataclasses.dataclass
class RayConfig:
    """What the deployments are built from (plain data: it travels to every replica).

    ``model``: :class:`~statetune.runtime.ModelOptions` fields; ``service``: the keyword arguments of
    :func:`~statetune.serve.startup.build_service`; ``affinity``: route by state (False: by load only).
    """

    model: dict[str, Any]
    service: dict[str, Any]
    replicas: int = 1
    api_key: str | None = None
    playground: bool = False
    access_log: bool = False
    affinity: bool = True
    grace_period: float = 10.0
    max_body: int = 4 << 20
    rescan_s: float = 2.0
    max_api_states: int = 32

    @property
    def cpus(self) -> int:
        """CPUs a replica asks Ray for: its torch threads (default 1)."""
        return int(self.model.get("threads") or 1)


class StateReplica:
    """One replica: a :class:`~statetune.serve.service.Service` and its app, answering requests in-process."""

    def __init__(self, config: dict[str, Any]) -> None:
        from statetune.runtime import ModelOptions
        from statetune.serve.app import create_app
        from statetune.serve.startup import build_service

        cfg = RayConfig(**config)
        self.service = build_service(ModelOptions(**cfg.model), **cfg.service)
        self.registry = self.service.registry
        self.service.batcher.start()
        self.app = create_app(self.service, None, cfg.max_body, playground=cfg.playground,
                              access_log=cfg.access_log, max_api_states=cfg.max_api_states)
        try:
            self.name = serve.get_replica_context().replica_id.unique_id
        except RuntimeError:  # built outside a replica (a test)
            self.name = "local"

        async def load(name: str) -> str:  # a plain function: Ray keeps its LRU as an attribute of it
            return await self._load_state(name)

        self._load = serve.multiplexed(max_num_models_per_replica=self.registry.max_loaded)(load)
        self._scan_lock = threading.Lock()
        self._dir_mtime, self._scanned = self._mtime(), time.monotonic()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, args=(cfg.rescan_s,), name="statetune-rescan", daemon=True).start()

    async def handle(self, request: dict[str, Any]):
        """Answer ``request`` (see :func:`~statetune.serve.relay.read_request`), yielding the app's ASGI
        messages in batches; the state it names (the multiplexed id) is looked up and loaded first."""
        name = serve.get_multiplexed_model_id()
        if name:
            if self.registry.get(name) is None:  # maybe written by another replica a moment ago
                await asyncio.to_thread(self.rescan, True)
            if self.registry.get(name) is not None:
                await self._load(name)  # tells Ray's router this replica has it
        async for batch in relay.run_asgi(self.app, request, self.name):
            yield batch

    async def _load_state(self, name: str) -> str:
        """Read the state ``name`` into this replica's LRU (the app reports a state that cannot be read)."""
        from statetune.serve.errors import ApiError

        entry = self.registry.get(name)
        if entry is not None:
            try:
                await self.service.start_state(entry)
            except ApiError:
                pass
        return name

    def rescan(self, miss: bool = False) -> None:
        """Reindex the states directory when it changed (``miss``: also when the last scan is over a second
        old, for a directory whose timestamps lag, such as NFS's)."""
        if self.registry.states_dir is None:
            return
        with self._scan_lock:
            mtime, now = self._mtime(), time.monotonic()
            if mtime == self._dir_mtime and not (miss and now - self._scanned > 1.0):
                return
            self._dir_mtime, self._scanned = mtime, now
            self.registry.reload()

    def _mtime(self) -> int | None:
        try:
            return self.registry.states_dir.stat().st_mtime_ns if self.registry.states_dir else None
        except OSError:
            return None

    def _watch(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.rescan()
            except Exception as e:  # a rescan that fails must not stop the next one
                log.warning("rescanning the states directory failed: %s: %s", type(e).__name__, e)

    def __del__(self) -> None:
        """Ray's graceful shutdown: requests in flight have had their time; stop the engine."""
        self._stop.set()
        self.service.draining = True
        self.service.batcher.cancel_all()
        self.service.batcher.stop()


@serve.ingress()
class Front:
    """The HTTP ingress: guard, read, route by state, relay the replica's answer (see the module docstring)."""

    def __init__(self, replicas: DeploymentHandle, config: dict[str, Any]) -> None:
        self.replicas, self.config = replicas, RayConfig(**config)

    def __serve_build_asgi_app__(self) -> relay.ASGIApp:
        return Guard(self._asgi, self.config.api_key, self.config.max_body)

    async def _asgi(self, scope: relay.Scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await relay.lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = await relay.read_request(scope, receive)
        if request["method"] == "POST" and request["path"] == "/v1/states" and not _persisted(request["body"]):
            await relay.reply(send, 400, "persist: states created on a server of Ray replicas are written to the "
                              "shared --states directory so that every replica serves them; send \"persist\": true")
            return
        name = relay.state_of(request) if self.config.affinity else None
        retries = 1 if request["method"] == "GET" or request["path"] in RETRIED else 0
        await self._forward(request, name, send, retries)

    async def _forward(self, request: dict[str, Any], name: str | None, send, retries: int) -> None:
        handle = self.replicas.options(stream=True, multiplexed_model_id=name or "")
        for attempt in range(retries + 1):
            start = None
            try:
                async for batch in handle.handle.remote(request):
                    for message in batch:
                        start = start or (message if message["type"] == "http.response.start" else None)
                        await send(message)
                return
            except RayError as e:
                lost = isinstance(e, RayActorError)
                why = (f"the replica answering this request stopped ({type(e).__name__})" if lost else
                       f"internal server error ({type(e).__name__})")
                if start is None and attempt < retries and lost:
                    log.warning("%s; sending %s to another replica", why, request["path"])
                    continue
                log.warning("%s while answering %s %s", why, request["method"], request["path"], exc_info=not lost)
                if start is None:
                    await relay.reply(send, 503 if lost else 500, why + ("; the server goes on, send it again"
                                                                         if lost else ""), "replica_failed")
                elif relay.is_stream(start):
                    await send({"type": "http.response.body", "body": relay.stream_error(why), "more_body": False})
                else:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return


def _persisted(body: bytes) -> bool:
    """Whether a ``POST /v1/states`` body asks for a file (a body that is no JSON object: the app says why)."""
    import json

    try:
        data = json.loads(body)
    except ValueError:
        return True
    return not isinstance(data, dict) or data.get("persist") is True


def build_application(config: RayConfig) -> serve.Application:
    """The Ray Serve application of ``config``: the front bound to ``config.replicas`` state replicas."""
    replica = serve.deployment(StateReplica, name="StateReplica").options(
        num_replicas=config.replicas, ray_actor_options={"num_cpus": config.cpus},
        max_ongoing_requests=4 * int(config.service.get("max_batch_size", 32)),
        graceful_shutdown_timeout_s=config.grace_period, health_check_period_s=2, health_check_timeout_s=30)
    front = serve.deployment(Front, name="Front").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    data = dataclasses.asdict(config)
    return front.bind(replica.bind(data), data)


def config_from_args(args: dict[str, Any]) -> RayConfig:
    """A :class:`RayConfig` from ``serve run``'s ``key=value`` arguments (``serve`` option names with ``_``
    or ``-``: ``model``, ``states``, ``replicas``, ``max_batch_size``...); values may be strings."""
    from statetune.runtime import ModelOptions
    from statetune.serve.startup import build_service

    model_fields = {f.name: f for f in dataclasses.fields(ModelOptions)}
    service_params = dict(inspect.signature(build_service).parameters)
    own = {f.name: f for f in dataclasses.fields(RayConfig) if f.name not in ("model", "service")}
    model, service, rest = {}, {"base_name": None}, {}
    for key, value in args.items():
        key = key.replace("-", "_")
        if key == "model_name":
            service["base_name"] = str(value)
        elif key in model_fields:
            model[key] = _coerce(key, value, model_fields[key].type)
        elif key in service_params and key != "runtime":
            service[key] = _coerce(key, value, service_params[key].annotation)
        elif key in own:
            rest[key] = _coerce(key, value, own[key].type)
        else:
            known = sorted({*model_fields, *service_params, *own, "model_name"} - {"runtime", "service", "base_name"})
            raise OptionError(f"{key}: not an argument of the statetune application; known: {', '.join(known)}")
    if "model" not in model:
        raise OptionError("model: missing; give model=PATH (the checkpoint every replica loads)")
    if service["base_name"] is None:
        from pathlib import Path

        service["base_name"] = Path(model["model"]).stem
    return RayConfig(model=model, service=service, **rest)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as the type ``annotation`` names (a string annotation, from ``from __future__``)."""
    kind = str(annotation)
    if not isinstance(value, str) or value == "" and "None" in kind:
        return None if value == "" else value
    try:
        if kind.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except ValueError:
        raise OptionError(f"{key}: expected {kind.split(' ')[0]}, got {value!r}") from None
    return value


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder of ``serve run statetune.serve.ray_app:build_app key=value ...`` and of a
    ``serve deploy`` config's ``import_path`` (its ``args`` are the same keys)."""
    return build_application(config_from_args(args))
