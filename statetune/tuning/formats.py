"""State file formats of the RWKV ecosystem, read and written losslessly (in each format's dtype).

- ``statetune``: safetensors, ``blocks.{i}.att.time_state`` ``[H, N, N]`` fp32 [value, key], optional
  ``blocks.{i}.att.time_shift`` / ``blocks.{i}.ffn.time_shift`` ``[C]``, and metadata (DESIGN.md).
- ``pth``: a ``torch.save`` dict ``{blocks.{i}.att.time_state: [H, N, N]}`` [value, key], as RWKV-PEFT and
  RWKV-LM write it and RWKV-Runner reads it (RWKV-7 as is; RWKV-6 is transposed by the reader).
- ``list``: the original state-tuning release, ``torch.save([att_shift, wkv, ffn_shift] * L)`` with
  wkv ``[H, N, N]`` [value, key]; keeps the token-shift states.
- ``ai00``: safetensors as web-rwkv / ai00_server read them: only ``blocks.{i}.att.time_state``, float16
  (the one dtype they accept), ``[H, key, value]`` (transposed from RWKV-PEFT's ``.pth``, as their own
  converter does). Float16 rounds the state (relative error ~5e-4) and cannot hold magnitudes ≥ 65504.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch

from statetune.errors import StateFileError
from statetune.fileio import atomic_write
from statetune.model.state import RWKVState
from statetune.tuning.statefile import (
    AI00_FORMAT,
    WKV_KEY,
    StateFile,
    from_tensors,
    load_state,
    save_state,
)

FORMATS = ("statetune", "pth", "list", "ai00")
log = logging.getLogger("statetune.state")


def read_any(path: str | Path, model=None) -> StateFile:
    """Read a state in any supported format (by extension and content)."""
    p = Path(path)
    if p.suffix == ".safetensors" or p.suffix == ".st":
        return load_state(p, model)
    if not p.is_file():
        raise StateFileError(f"{p}: no such state file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise StateFileError(f"{p}: not a readable state file (.pth read with weights_only=True): "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if isinstance(obj, dict):
        sf = from_tensors(obj, p, {})
    elif isinstance(obj, list | tuple):
        sf = _from_list(list(obj), p)
    else:
        raise StateFileError(f"{p}: unknown state format: a {type(obj).__name__}, expected a dict of "
                             f"time_state tensors or a list [att_shift, wkv, ffn_shift] * layers")
    if model is not None:
        from statetune.tuning.statefile import check_fits

        check_fits(sf, model, p)
        sf.state = sf.state.to(device=model.device, dtype=model.dtype)
    return sf


def _from_list(items: list, where: Path) -> StateFile:
    if not items or len(items) % 3 or not all(isinstance(t, torch.Tensor) for t in items):
        raise StateFileError(f"{where}: a list state must hold [att_shift, wkv, ffn_shift] * layers tensors; "
                             f"got {len(items)} items")
    L = len(items) // 3
    try:
        att = torch.stack([items[3 * i].float().reshape(-1) for i in range(L)]).unsqueeze(1)
        wkv = torch.stack([items[3 * i + 1].float() for i in range(L)]).unsqueeze(1)
        ffn = torch.stack([items[3 * i + 2].float().reshape(-1) for i in range(L)]).unsqueeze(1)
    except RuntimeError as e:
        raise StateFileError(f"{where}: list state tensors have inconsistent shapes: {e}") from None
    if wkv.dim() != 5 or wkv.shape[-1] != wkv.shape[-2] or wkv.shape[2] * wkv.shape[3] != att.shape[-1]:
        raise StateFileError(f"{where}: list state wkv has shape {tuple(wkv.shape[2:])}, expected [H, N, N] with "
                             f"H*N = {att.shape[-1]}")
    return StateFile(RWKVState(att, wkv, ffn), {}, True)


def write_as(sf: StateFile, path: str | Path, fmt: str, model=None) -> None:
    """Write ``sf`` in ``fmt``; warns when the format cannot hold the token-shift states."""
    if fmt not in FORMATS:
        raise StateFileError(f"unknown state format {fmt!r}; choose from {', '.join(FORMATS)}")
    s = sf.state
    if fmt in ("pth", "ai00") and sf.has_shift and bool(s.att_shift.any() or s.ffn_shift.any()):
        log.warning("the %s format holds only the WKV states: the token-shift states are dropped", fmt)
    if fmt == "statetune":
        meta = {k: v for k, v in sf.metadata.items() if k not in ("format", "statetune_version")}
        save_state(path, s, model, meta, with_shift=sf.has_shift)
        return
    wkv = {WKV_KEY.format(i=i): s.wkv[i, 0].detach().float().cpu().contiguous() for i in range(s.n_layer)}
    if fmt == "pth":
        atomic_write(path, lambda tmp: torch.save(wkv, tmp))
    elif fmt == "ai00":
        from safetensors.torch import save_file

        big = max(t.abs().max().item() for t in wkv.values())
        if not big < torch.finfo(torch.float16).max:
            raise StateFileError(f"{path}: the ai00 format stores float16, which cannot hold this state's largest "
                                 f"entry ({big:.4g}); keep it in the statetune or pth format")
        half = {k: t.transpose(-1, -2).to(torch.float16).contiguous() for k, t in wkv.items()}
        atomic_write(path, lambda tmp: save_file(half, tmp, metadata={"format": AI00_FORMAT}))
    else:
        items = []
        for i in range(s.n_layer):
            items += [s.att_shift[i, 0].float().cpu(), s.wkv[i, 0].float().cpu(), s.ffn_shift[i, 0].float().cpu()]
        atomic_write(path, lambda tmp: torch.save(items, tmp))
