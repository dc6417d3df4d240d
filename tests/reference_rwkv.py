"""The official ``rwkv`` package as a reference: RWKV-7 and RWKV-6 classes side by side.

The package picks its RWKV-7 code path from ``RWKV_V7_ON`` at import time, so the module file is
executed twice under different names, once with the variable set and once without.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import torch

from statetune.model.state import RWKVState


@functools.cache
def _module(v7: bool):
    spec = importlib.util.find_spec("rwkv.model")
    name = f"_rwkv_reference_{'v7' if v7 else 'v6'}"
    # the package reads these at construction time too, so they stay set
    os.environ["RWKV_JIT_ON"], os.environ["RWKV_CUDA_ON"] = "1", "0"
    old = os.environ.get("RWKV_V7_ON")
    os.environ["RWKV_V7_ON"] = "1" if v7 else "0"
    try:
        mod_spec = importlib.util.spec_from_file_location(name, spec.origin)
        mod = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = mod
        mod_spec.loader.exec_module(mod)
    finally:
        if old is None:
            os.environ.pop("RWKV_V7_ON")
        else:
            os.environ["RWKV_V7_ON"] = old
    return mod


def reference_model(path: Path, version: str):
    """The official implementation on ``path`` (a ``.pth``), strategy ``cpu fp32``."""
    if version == "rwkv7":
        return _module(True).RWKV_x070(str(path)[: -len(".pth")], "cpu fp32")
    return _module(False).RWKV(str(path), "cpu fp32", verbose=False)


def to_reference_state(state: RWKVState, row: int, version: str) -> list[torch.Tensor]:
    """statetune's state row → the package's ``[att_x, wkv, ffn_x] * L`` list (RWKV-6 wkv is [H, K, V])."""
    out = []
    for i in range(state.n_layer):
        wkv = state.wkv[i, row].clone().float()
        if version == "rwkv6":
            wkv = wkv.transpose(-1, -2).contiguous()
        out += [state.att_shift[i, row].clone().float(), wkv, state.ffn_shift[i, row].clone().float()]
    return out


def from_reference_state(ref: list[torch.Tensor], version: str) -> RWKVState:
    """The package's state list → a batch-1 statetune state."""
    L = len(ref) // 3
    wkv = [ref[3 * i + 1] for i in range(L)]
    if version == "rwkv6":
        wkv = [w.transpose(-1, -2) for w in wkv]
    return RWKVState(torch.stack([ref[3 * i] for i in range(L)]).unsqueeze(1),
                     torch.stack(wkv).unsqueeze(1),
                     torch.stack([ref[3 * i + 2] for i in range(L)]).unsqueeze(1))
