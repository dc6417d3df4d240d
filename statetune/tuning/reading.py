"""The one reader of state files: every format statetune writes, recognised by content, checked completely.

A file is a safetensors state (statetune's, RWKV-PEFT's or ai00's) or a ``torch.save`` of a dict of
``time_state`` tensors or of the original ``[att_shift, wkv, ffn_shift] * L`` list, read with
``weights_only=True`` (nothing is unpickled). Whatever the format, every tensor must be floating point and
finite, every layer must be present with the same ``[H, N, N]`` shape, token-shift vectors ``[H*N]`` must
be there for every layer or for none, and no key may be left unexplained: a misfit is a
:class:`StateFileError` naming the file, the key, what was expected and what was found.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from statetune.errors import StateFileError
from statetune.model.state import RWKVState
from statetune.tuning.keys import (
    AI00_FORMAT,
    ATT_SHIFT_KEY,
    FFN_SHIFT_KEY,
    FORMAT,
    SHIFT_KEYS,
    WKV_KEY,
    StateFile,
    check_header_length,
    decode_metadata,
    has_token_shift,
    layer_shapes,
    layers_by_key,
)

_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"


def read_file(path: str | Path) -> StateFile:
    """Read and check a state file of any supported format (told apart by its first bytes)."""
    p = Path(path)
    if not p.is_file():
        raise StateFileError(f"{p}: no such state file")
    with p.open("rb") as fh:
        head = fh.read(9)
    if not head:
        raise StateFileError(f"{p}: empty file, not a state")
    if _is_safetensors(head, p.stat().st_size):  # first: its length prefix may begin with the pickle byte
        check_header_length(p, int.from_bytes(head[:8], "little"))
        return _read_safetensors(p)
    if head.startswith(_ZIP) or head.startswith(_PICKLE):
        return _read_torch(p)
    return _read_safetensors(p)


def _is_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length that fits the file, then the header's opening ``{``."""
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= size - 8


def _read_safetensors(p: Path) -> StateFile:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            raw_meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise StateFileError(f"{p}: not a readable state file (neither torch.save nor valid safetensors: "
                             f"{e})") from None
    meta = decode_metadata(raw_meta)
    _check_tensors(tensors, p)
    if is_ai00(tensors, meta):
        tensors = {k: v.transpose(-1, -2) if k.endswith(".att.time_state") else v for k, v in tensors.items()}
    return from_tensors(tensors, p, meta)


def _read_torch(p: Path) -> StateFile:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            AttributeError, ImportError, IndexError, KeyError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StateFileError(f"{p}: not a readable state file (.pth read with weights_only=True): {first}") from None
    if isinstance(obj, dict):
        _check_tensors(obj, p)
        return from_tensors({str(k): v for k, v in obj.items()}, p, {})
    if isinstance(obj, list | tuple):
        return _from_list(list(obj), p)
    raise StateFileError(f"{p}: unknown state format: a {type(obj).__name__}, expected a dict of "
                         f"time_state tensors or a list [att_shift, wkv, ffn_shift] * layers")


def _check_tensors(tensors: dict, where: Path) -> None:
    """Every value a floating-point tensor with finite entries; the error names the key."""
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise StateFileError(f"{where}: {k}: expected a tensor, found a {type(t).__name__}")
        if not t.is_floating_point():
            raise StateFileError(f"{where}: {k}: expected a floating-point tensor, found {t.dtype} "
                                 "(an integer, boolean or complex tensor is not a state)")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise StateFileError(f"{where}: {k}: {bad} of {t.numel()} values are NaN or infinite")


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
    """A state from ``blocks.{i}.att.time_state`` (and optional shift) tensors, checked key by key."""
    _check_tensors(tensors, Path(where))
    found, unknown = layers_by_key(tensors)
    if not found[WKV_KEY]:
        raise StateFileError(f"{where}: unknown state format: no key {WKV_KEY.format(i=0)!r}; found "
                             f"{', '.join(sorted(map(str, tensors))[:5]) or 'nothing'}")
    if unknown:
        raise StateFileError(f"{where}: unexpected key(s) {', '.join(sorted(unknown)[:5])}: a state file holds "
                             f"only {WKV_KEY} and optional token-shift vectors (is this a model checkpoint?)")
    n_layer = max(found[WKV_KEY]) + 1
    _all_layers(found[WKV_KEY], n_layer, WKV_KEY, where)
    first = tensors[WKV_KEY.format(i=0)]
    if first.dim() != 3 or first.shape[1] != first.shape[2]:
        raise StateFileError(f"{where}: {WKV_KEY.format(i=0)}: expected shape [heads, N, N], "
                             f"found {list(first.shape)}")
    shapes = layer_shapes(first.shape[0], first.shape[1])
    for i in range(1, n_layer):
        t = tensors[WKV_KEY.format(i=i)]
        if list(t.shape) != shapes[WKV_KEY]:
            raise StateFileError(f"{where}: {WKV_KEY.format(i=i)}: expected shape {shapes[WKV_KEY]} "
                                 f"(as layer 0), found {list(t.shape)}")
    wkv = torch.stack([tensors[WKV_KEY.format(i=i)].float() for i in range(n_layer)]).unsqueeze(1)
    (C,) = shapes[ATT_SHIFT_KEY]
    has_shift = has_token_shift(found)
    if has_shift:
        shifts = []
        for key in SHIFT_KEYS:
            _all_layers(found[key], n_layer, key, where, "token-shift vectors are stored for "
                        "every layer or for none")
            shifts.append(torch.stack([_vector(tensors[key.format(i=i)], C, key.format(i=i), where)
                                       for i in range(n_layer)]).unsqueeze(1))
        att, ffn = shifts
    else:
        att, ffn = torch.zeros(n_layer, 1, C), torch.zeros(n_layer, 1, C)
    return StateFile(RWKVState(att, wkv, ffn), metadata, has_shift)


def _all_layers(have: set[int], n_layer: int, key: str, where: str | Path, why: str = "") -> None:
    missing = [i for i in range(n_layer) if i not in have]
    if missing:
        extra = f"; {why}" if why else ""
        raise StateFileError(f"{where}: missing {key.format(i=missing[0])} (the state has {n_layer} layers"
                             f"{extra})")
    if max(have) >= n_layer:
        raise StateFileError(f"{where}: {key.format(i=max(have))}: a layer beyond the state's {n_layer} layers")


def _vector(t: torch.Tensor, C: int, key: str, where: str | Path) -> torch.Tensor:
    """A token-shift state as ``[C]`` (files may store it as ``[1, 1, C]``); anything else is refused."""
    if t.numel() != C or (t.dim() > 1 and t.shape[-1] != C):
        raise StateFileError(f"{where}: {key}: expected shape [{C}] (heads x head size), found {list(t.shape)}")
    return t.float().reshape(C)


def _from_list(items: list, where: Path) -> StateFile:
    """The original release's ``[att_shift, wkv, ffn_shift] * L`` list, checked as the dict form is."""
    if not items or len(items) % 3:
        raise StateFileError(f"{where}: a list state must hold [att_shift, wkv, ffn_shift] * layers tensors; "
                             f"got {len(items)} items")
    names = (ATT_SHIFT_KEY, WKV_KEY, FFN_SHIFT_KEY)
    tensors = {names[j % 3].format(i=j // 3): t for j, t in enumerate(items)}
    return from_tensors(tensors, where, {})
