"""Running :mod:`statetune.serve.ray_app` from ``statetune serve --ray``: join a cluster or start a local one
(loopback only, no dashboard), deploy, wait for Ctrl-C or SIGTERM, and take down what was started.

Joined to a running cluster (``--ray-address``), only this application is deleted at the end: the cluster
and its other applications stay. A local Ray instance is started for the server and stopped with it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

from statetune.errors import OptionError, StatetuneError

if TYPE_CHECKING:
    from statetune.serve.ray_app import RayConfig

log = logging.getLogger("statetune.serve")


def init_local(num_cpus: int) -> None:
    """Start a Ray instance for this process alone (no dashboard; Ray's token authentication, on by default
    since Ray 2.5x, guards its own ports); it stops with the process or at ``ray.shutdown()``."""
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)


def run_ray(config: RayConfig, host: str, port: int, address: str | None = None) -> int:
    """Serve ``config`` on ``host:port`` through Ray Serve's HTTP proxy until interrupted; returns 0."""
    if port == 0:
        from statetune.serve.startup import bound_socket

        with bound_socket(host, 0) as sock:  # Ray's proxy needs a number: take a free one
            port = sock.getsockname()[1]
    local = address is None
    import ray
    from ray import serve

    from statetune.serve.ray_app import APP_NAME, build_application

    on_term = signal.getsignal(signal.SIGTERM)
    try:
        if local:
            init_local(max(os.cpu_count() or 1, config.replicas * config.cpus))
        else:
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"--ray-address {address}" if address else "a local Ray instance"
        raise StatetuneError(f"{where}: cannot start or join Ray: {_summary(e)}") from None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)  # ray.init exits on SIGTERM at once: keep our clean stop
    try:
        try:
            serve.start(http_options={"host": host, "port": port})
            log.info("starting %d replica(s) of the model on Ray (%s)", config.replicas,
                     "local instance" if local else address)
            serve.run(build_application(config), name=APP_NAME, route_prefix="/")
        except Exception as e:  # a replica that cannot start (its traceback is in the replica's log above)
            raise StatetuneError(f"the Ray replicas did not start: {_summary(e)}") from None
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        log.info("listening on %s (OpenAI base URL %s/v1), %d replica(s) on Ray", url, url, config.replicas)
        while True:
            time.sleep(1)
    finally:
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
        log.info("stopped")


def check_ray() -> None:
    """A usage error when Ray Serve is not installed."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # (find_spec("ray.serve") would import ray, too early)
        raise OptionError("--ray: needs Ray Serve: pip install 'statetune[ray]'") from None


def _summary(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:400]
