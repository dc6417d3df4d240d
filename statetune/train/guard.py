"""Nothing non-finite is ever written: the checks a run makes after each step, and the faults tests inject.

A step whose loss or updated parameters are not finite stops the run before anything is written, so the last
checkpoint and the state files stay exactly as they were (byte for byte).
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import torch

from statetune.errors import StatetuneError
from statetune.model.state import RWKVState
from statetune.train.checkpoint import list_checkpoints

FAULT_VAR = "STATETUNE_KILL_AT_STEP"


def non_finite(run_dir: Path, step: int, what: str) -> StatetuneError:
    """The error that stops a run at ``step``: what went wrong, what was kept, what to do."""
    ckpts = list_checkpoints(run_dir)
    last = f"its last checkpoint ({ckpts[-1].name})" if ckpts else "no checkpoint yet"
    return StatetuneError(f"step {step}: {what}; training stopped before writing a checkpoint or state, so the "
                          f"run keeps {last} and its state files as they were. Check the model and data for "
                          f"values that overflow, or start a new run with a lower --lr (--init "
                          f"{run_dir / 'state-best.safetensors'} keeps the progress, if it exists)")


def check_step(run_dir: Path, step: int, loss: float, grad_norm: float, params: list[torch.Tensor]) -> None:
    """Raise ``non_finite`` when step ``step`` gave a non-finite loss or left a parameter non-finite."""
    if not math.isfinite(loss):
        raise non_finite(run_dir, step, f"the training loss is {loss}")
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise non_finite(run_dir, step, f"the trained parameters became non-finite (gradient norm {grad_norm:.4g})")


def state_is_finite(state: RWKVState) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (state.wkv, state.att_shift, state.ffn_shift))


def inject_signal(step: int) -> None:
    """Fault injection for the resume tests: ``STATETUNE_KILL_AT_STEP=N`` (SIGKILL) or ``N:INT`` (SIGINT, as
    Ctrl-C would send) makes the process signal itself after step ``N`` (``N:NAN``: see ``poison``)."""
    at, _, mode = os.environ.get(FAULT_VAR, "").partition(":")
    if at == str(step) and mode != "NAN":
        os.kill(os.getpid(), signal.SIGINT if mode == "INT" else signal.SIGKILL)


def poison(params: list[torch.Tensor], step: int) -> list:
    """Fault injection for the non-finite guard: ``STATETUNE_KILL_AT_STEP=N:NAN`` turns every gradient of
    step ``N`` into NaN through autograd hooks, so the real clipping and optimizer paths carry it on.
    Returns the hook handles (remove them after the step)."""
    at, _, mode = os.environ.get(FAULT_VAR, "").partition(":")
    if mode != "NAN" or at != str(step):
        return []
    return [p.register_hook(lambda g: torch.full_like(g, math.nan)) for p in params]
