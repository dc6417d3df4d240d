"""State files: ``blocks.{i}.att.time_state`` ``[H, N, N]`` fp32 [value, key] in safetensors.

The key and layout are those of RWKV-PEFT and RWKV-LM, so RWKV-Runner and the ``rwkv`` package read the
file; statetune adds optional token-shift tensors and metadata (see DESIGN.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from statetune._version import __version__
from statetune.errors import StateFileError
from statetune.fileio import atomic_write
from statetune.model.state import RWKVState

FORMAT = "statetune-state/1"
WKV_KEY = "blocks.{i}.att.time_state"
ATT_SHIFT_KEY = "blocks.{i}.att.time_shift"
FFN_SHIFT_KEY = "blocks.{i}.ffn.time_shift"


@dataclass
class StateFile:
    """A batch-1 state and its metadata; ``has_shift`` says whether token-shift states were stored."""

    state: RWKVState
    metadata: dict[str, Any] = field(default_factory=dict)
    has_shift: bool = False


def model_metadata(model) -> dict[str, Any]:
    """The metadata fields that tie a state to its base model."""
    cfg = model.config
    return {"model_version": cfg.version, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "head_size": cfg.head_size, "vocab_size": cfg.vocab_size, "model_fingerprint": model.fingerprint()}


def save_state(path: str | Path, state: RWKVState, model=None, metadata: dict[str, Any] | None = None,
               with_shift: bool = False) -> None:
    """Write row 0 of ``state`` as a state file (atomically); shift vectors only when ``with_shift``."""
    from safetensors.torch import save_file

    tensors = {}
    for i in range(state.n_layer):
        tensors[WKV_KEY.format(i=i)] = state.wkv[i, 0].detach().float().cpu().contiguous()
        if with_shift:
            tensors[ATT_SHIFT_KEY.format(i=i)] = state.att_shift[i, 0].detach().float().cpu().contiguous()
            tensors[FFN_SHIFT_KEY.format(i=i)] = state.ffn_shift[i, 0].detach().float().cpu().contiguous()
    meta: dict[str, Any] = {"format": FORMAT, "statetune_version": __version__}
    if model is not None:
        meta.update(model_metadata(model))
    meta.update({k: v for k, v in (metadata or {}).items() if k not in ("format", "statetune_version")})
    str_meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=str_meta))


def _decode_meta(raw: dict[str, str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def load_state(path: str | Path, model=None, check_fingerprint: bool = True) -> StateFile:
    """Read a state file (statetune's, or any with ``blocks.{i}.att.time_state`` keys).

    With ``model``, the shapes must fit it and a recorded fingerprint must match it; otherwise a
    :class:`StateFileError` names the file and what differs.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise StateFileError(f"{p}: no such state file")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw_meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise StateFileError(f"{p}: not a readable safetensors state file: {e}") from None
    meta = _decode_meta(raw_meta)
    if is_ai00(tensors, meta):
        tensors = {k: v.transpose(-1, -2) if k.endswith(".att.time_state") else v for k, v in tensors.items()}
    sf = from_tensors(tensors, p, meta)
    if model is not None:
        check_fits(sf, model, p, check_fingerprint)
        sf.state = sf.state.to(device=model.device, dtype=model.dtype)
    return sf


AI00_FORMAT = "ai00-state"


def is_ai00(tensors: dict, metadata: dict[str, Any]) -> bool:
    """Whether safetensors state tensors are in web-rwkv / ai00_server's layout: ``[H, key, value]`` float16.

    ai00 reads only float16 states, so a float16 ``time_state`` without statetune's own format tag is taken
    to be one (statetune writes fp32 ``[H, value, key]``); files statetune writes for ai00 are tagged.
    """
    if metadata.get("format") == AI00_FORMAT:
        return True
    first = tensors.get(WKV_KEY.format(i=0))
    return metadata.get("format") != FORMAT and first is not None and first.dtype == torch.float16


def from_tensors(tensors: dict, where: str | Path, metadata: dict[str, Any]) -> StateFile:
    """A state from ``blocks.{i}.att.time_state`` (and optional shift) tensors, however they were stored."""
    n_layer = 0
    while WKV_KEY.format(i=n_layer) in tensors:
        n_layer += 1
    if n_layer == 0:
        raise StateFileError(f"{where}: unknown state format: no key {WKV_KEY.format(i=0)!r}; found "
                             f"{', '.join(sorted(map(str, tensors))[:5]) or 'nothing'}")
    wkv = torch.stack([tensors[WKV_KEY.format(i=i)].float() for i in range(n_layer)]).unsqueeze(1)
    C = wkv.shape[2] * wkv.shape[3]
    has_shift = ATT_SHIFT_KEY.format(i=0) in tensors
    if has_shift:
        att = torch.stack([tensors[ATT_SHIFT_KEY.format(i=i)].float() for i in range(n_layer)]).unsqueeze(1)
        ffn = torch.stack([tensors[FFN_SHIFT_KEY.format(i=i)].float() for i in range(n_layer)]).unsqueeze(1)
    else:
        att, ffn = torch.zeros(n_layer, 1, C), torch.zeros(n_layer, 1, C)
    return StateFile(RWKVState(att, wkv, ffn), metadata, has_shift)


def check_fits(sf: StateFile, model, where: str | Path, check_fingerprint: bool = True) -> None:
    """Raise :class:`StateFileError` unless the state's shapes (and fingerprint, if recorded) fit ``model``."""
    cfg = model.config
    want = (cfg.n_layer, 1, cfg.n_head, cfg.head_size, cfg.head_size)
    have = tuple(sf.state.wkv.shape)
    if have != want:
        raise StateFileError(
            f"{where}: state for {have[0]} layers of {have[2]} heads x {have[3]} does not fit the model "
            f"({cfg.n_layer} layers of {cfg.n_head} heads x {cfg.head_size})")
    fp = sf.metadata.get("model_fingerprint")
    if check_fingerprint and fp is not None and fp != model.fingerprint():
        raise StateFileError(f"{where}: state was trained on a different base model (fingerprint {fp}, "
                             f"this model's is {model.fingerprint()})")
