"""Run the check's parts one after another, each under its own time limit, saving the report after each.

A part is a function ``fn(opts) -> result`` (any JSON value). Its result goes to ``report[name]`` and its
entry ``report["parts"][name]`` says ``{"status": "ok", "seconds": ..., "limit_s": ...}``, or why there is
no result: ``timed out after N s``, ``error: <type>: <message>``, ``crashed: exit code N`` or ``skipped:
<why>``. Nothing a part
does stops the parts after it, and the JSON report is rewritten atomically after every part, so a run killed
midway keeps what finished.

Two ways to run a part:

* ``process`` (the default on CUDA): in a fresh interpreter (multiprocessing's spawn), in a process group of
  its own that is killed at the limit, with every process it started. A hung kernel, a compiler that never
  returns or a server that does not stop cannot hold up the parts after it, and every part starts with
  empty GPU memory, so peaks are its own.
* ``inline`` (the default on CPU, and what the test suite uses): in this process, the limit enforced by
  ``SIGALRM`` where there is one (the main thread of a POSIX process): Python code is interrupted; a single
  call into native code that never returns is not.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchio import write_json


@dataclass(frozen=True)
class Part:
    """One section of the check: a picklable module-level function and the seconds it may take."""

    name: str
    fn: Callable[[Any], Any]
    limit_s: float


class PartTimeout(Exception):
    """Raised inside an inline part when its time is up."""


def error_status(e: BaseException) -> str:
    """``error: <type>: <first line>`` (the whole traceback stays in the part's ``traceback`` field)."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"error: {type(e).__name__}: {first}"


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in this thread after ``seconds`` (a no-op where SIGALRM is unavailable, and
    for an infinite limit)."""
    usable = hasattr(signal, "SIGALRM") and _main_thread() and seconds != float("inf")
    if not usable:
        yield
        return

    def ring(signum: int, frame: Any) -> None:
        raise PartTimeout

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_inline(part: Part, opts: Any, limit_s: float) -> dict[str, Any]:
    """Run ``part`` in this process; its report entry."""
    t0 = time.perf_counter()
    try:
        with alarm(limit_s):
            result = part.fn(opts)
    except PartTimeout:
        return {"status": f"timed out after {limit_s:.3g} s", "seconds": time.perf_counter() - t0}
    except Exception as e:  # a part's failure is a finding, not the end of the check
        return {"status": error_status(e), "seconds": time.perf_counter() - t0,
                "traceback": traceback.format_exc()[-4000:]}
    return {"status": "ok", "seconds": time.perf_counter() - t0, "result": result}


def _child(fn: Callable[[Any], Any], opts: Any, out: str) -> None:
    """The body of a ``process`` part: its own process group, its entry written to ``out`` as JSON."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    entry = run_inline(Part("child", fn, float("inf")), opts, float("inf"))
    tmp = out + ".tmp"
    Path(tmp).write_text(json.dumps(entry, default=str, allow_nan=False))
    os.replace(tmp, out)


def run_process(part: Part, opts: Any, limit_s: float) -> dict[str, Any]:
    """Run ``part`` in a spawned interpreter, killed (with its process group) at ``limit_s``."""
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "entry.json")
        proc = ctx.Process(target=_child, args=(part.fn, opts, out), name=f"gpu_check:{part.name}")
        proc.start()
        proc.join(limit_s)
        timed_out = proc.is_alive()
        _kill_group(proc.pid)
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        seconds = time.perf_counter() - t0
        if timed_out:
            return {"status": f"timed out after {limit_s:.3g} s", "seconds": seconds}
        if not os.path.exists(out):
            return {"status": f"crashed: exit code {proc.exitcode}", "seconds": seconds}
        entry = json.loads(Path(out).read_text())
    entry["seconds"] = seconds  # the part's wall time, interpreter start included
    return entry


def _kill_group(pid: int | None) -> None:
    """SIGKILL the process group led by ``pid`` (servers and compilers a part started go with it)."""
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_parts(parts: list[Part], opts: Any, report: dict[str, Any], out: str | Path, isolate: str,
              budget_s: float, on_done: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``parts`` in order into ``report["parts"]``, rewriting ``out`` after each.

    Each part gets ``min(its limit, what is left of budget_s)``; once the budget is spent the remaining
    parts are recorded as skipped (so the whole run ends inside the budget, plus one part's start-up).
    """
    runner = run_process if isolate == "process" else run_inline
    report.setdefault("parts", {})
    start = time.perf_counter()
    for part in parts:
        left = budget_s - (time.perf_counter() - start)
        if left < 1:
            entry: dict[str, Any] = {"status": f"skipped: the {budget_s:.0f} s budget was spent", "seconds": 0.0}
        else:
            entry = runner(part, opts, min(part.limit_s, left))
        entry["limit_s"] = part.limit_s
        if "result" in entry:  # results at the top level, statuses and times under "parts"
            report[part.name] = entry.pop("result")
        report["parts"][part.name] = entry
        report["elapsed_s"] = time.perf_counter() - start
        write_json(report, out)
        if on_done is not None:
            on_done(part.name, entry)
    return report
