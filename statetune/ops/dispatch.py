"""Which WKV implementation runs: chosen by device and what is installed, never imported eagerly."""

from __future__ import annotations

import functools
import importlib.util
import os

from torch import Tensor

from statetune.errors import OptionError

IMPLS = ("auto", "reference", "chunked", "fla")


@functools.cache
def fla_available() -> bool:
    """True when flash-linear-attention and Triton can be imported (checked once, lazily)."""
    if os.environ.get("STATETUNE_NO_FLA") == "1":
        return False
    return importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None


def choose(impl: str, x: Tensor) -> str:
    """Resolve ``impl`` ("auto" picks fla on CUDA when installed, else the chunked torch path)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown WKV implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if impl == "auto":
        impl = os.environ.get("STATETUNE_WKV", "auto")  # a process-wide override, for debugging
        if impl not in IMPLS:
            raise ValueError(f"STATETUNE_WKV={impl!r}: choose from {', '.join(IMPLS)}")
    if impl == "fla":
        check_fla(x)
    if impl != "auto":
        return impl
    if x.is_cuda and fla_available():
        return "fla"
    return "chunked"


def into(out: Tensor | None, y: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, state)``, the state copied into ``out`` first when one is given (the paths that cannot write
    there directly)."""
    return (y, state) if out is None else (y, out.copy_(state))


def triton_interpreter_on() -> bool:
    """True when Triton's interpreter is switched on (``TRITON_INTERPRET=1``): kernels then run on CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_fla(x: Tensor) -> None:
    """Refuse the fla path where it cannot run, before Triton fails deep inside with "0 active drivers"."""
    source = "STATETUNE_WKV=fla" if os.environ.get("STATETUNE_WKV") == "fla" else "WKV implementation 'fla'"
    if not fla_available():
        raise OptionError(f"{source}: flash-linear-attention is not installed (or STATETUNE_NO_FLA=1); install "
                          f"the 'cuda' extra (pip install 'statetune[cuda]') or use 'chunked'")
    if not x.is_cuda and not triton_interpreter_on():
        raise OptionError(f"{source}: fla's kernels need CUDA tensors, got {x.device.type}; use 'chunked' on "
                          f"CPU (or set TRITON_INTERPRET=1 to run them in Triton's interpreter, slowly, for tests)")
