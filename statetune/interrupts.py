"""SIGTERM handled like Ctrl-C: whatever a command does on an interrupt (stop cleanly, remove temporary
files, save a checkpoint) it also does when asked to terminate."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

_state = {"terminated": False}


def _on_sigterm(signum: int, frame: Any) -> None:
    _state["terminated"] = True
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)  # the command's own Ctrl-C handler, if it installed one
    else:
        raise KeyboardInterrupt


def terminated() -> bool:
    """Whether the interrupt being handled came from SIGTERM (a session should end, not just drop a turn)."""
    return _state["terminated"]


def handle_sigterm() -> Callable[[], None]:
    """Route SIGTERM to the SIGINT handler (in the main thread only); returns a function that undoes it."""
    _state["terminated"] = False
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, old)
