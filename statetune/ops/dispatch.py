"""Which WKV implementation runs: chosen by device and what is installed, never imported eagerly."""

from __future__ import annotations

import functools
import importlib.util
import os

from torch import Tensor

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
    if impl != "auto":
        return impl
    if x.is_cuda and fla_available():
        return "fla"
    return "chunked"
