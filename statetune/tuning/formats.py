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
from pathlib import Path

import torch

from statetune.errors import OptionError, StateFileError
from statetune.fileio import atomic_write
from statetune.tuning.statefile import AI00_FORMAT, WKV_KEY, StateFile, load_state, save_state

FORMATS = ("statetune", "pth", "list", "ai00")
#: The container each format is written in, and the file extensions that name that container.
SAFETENSORS_SUFFIXES, TORCH_SUFFIXES = (".safetensors", ".st"), (".pth", ".pt")
_SUFFIXES = {"statetune": SAFETENSORS_SUFFIXES, "ai00": SAFETENSORS_SUFFIXES, "pth": TORCH_SUFFIXES,
             "list": TORCH_SUFFIXES}
log = logging.getLogger("statetune.state")


def read_any(path: str | Path, model=None) -> StateFile:
    """Read a state in any supported format; the same reader as :func:`load_state` (kept for callers)."""
    return load_state(path, model)


def format_for(path: str | Path, fmt: str | None, flag: str) -> str:
    """The format to write ``path`` in: ``fmt`` if given, else the one its extension names.

    A safetensors format under a ``.pth`` name (or the reverse) is refused, so no file's name lies about
    its content: ``.safetensors``/``.st`` → statetune (or ai00), ``.pth``/``.pt`` → pth (or list).
    """
    suffix = Path(path).suffix.lower()
    if not fmt:
        if suffix in SAFETENSORS_SUFFIXES:
            return "statetune"
        if suffix in TORCH_SUFFIXES:
            return "pth"
        raise OptionError(f"{flag}: cannot tell the state format from the name {str(path)!r}: end it in "
                          f".safetensors (statetune) or .pth (RWKV-Runner), or give --to")
    if fmt not in FORMATS:
        raise OptionError(f"--to: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if suffix not in _SUFFIXES[fmt]:
        raise OptionError(f"{flag}: the {fmt} format is written as {' or '.join(_SUFFIXES[fmt])}, not "
                          f"{suffix or 'a name without an extension'}; rename the output")
    return fmt


def write_as(sf: StateFile, path: str | Path, fmt: str, model=None) -> None:
    """Write ``sf`` in ``fmt``; warns when the format cannot hold the token-shift states."""
    if fmt not in FORMATS:
        raise StateFileError(f"unknown state format {fmt!r}; choose from {', '.join(FORMATS)}")
    s = sf.state
    for name, t in zip(("wkv", "att_shift", "ffn_shift"), (s.wkv, s.att_shift, s.ffn_shift), strict=True):
        if not bool(torch.isfinite(t).all()):
            raise StateFileError(f"{path}: not written: the {name} state holds NaN or infinite values")
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
