"""Index a state file from its safetensors header alone: names, shapes, dtypes and metadata, no tensor data.

A safetensors file starts with an 8-byte little-endian length and that many bytes of JSON: one entry per
tensor (``dtype``, ``shape``, ``data_offsets``) and ``__metadata__``. Reading only that lets a server index
thousands of state files at start in the time it takes to open them, and refuse, before any request, a file
that cannot fit the model (missing layers, other shapes, a non-float dtype, token-shift vectors for some
layers only, keys that are no state key, another model's fingerprint, metadata ``load_state`` refuses). The
key, shape and metadata rules are the state reader's own (``tuning/keys.py``, ``tuning/statefile.py``); the
values themselves are checked when the state is first read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from statetune.errors import StateFileError
from statetune.tuning.keys import (
    FLOAT_DTYPES,
    KEYS,
    WKV_KEY,
    check_header_length,
    decode_metadata,
    has_token_shift,
    layer_shapes,
    layers_by_key,
)
from statetune.tuning.statefile import check_metadata


@dataclass(frozen=True)
class Header:
    """What a state file's header says: its metadata (JSON values decoded), size and token-shift presence."""

    metadata: dict[str, Any]
    nbytes: int
    has_shift: bool


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor entries and the raw ``__metadata__`` of a safetensors file, reading only its header."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StateFileError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            check_header_length(path, n)
            raw = f.read(n)
    except OSError as e:
        raise StateFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) < n:
        raise StateFileError(f"{path}: truncated safetensors header ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateFileError(f"{path}: not a safetensors file: its header is not JSON ({e})") from None
    except RecursionError:
        raise StateFileError(f"{path}: not a safetensors file: its header is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise StateFileError(f"{path}: not a safetensors file: its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise StateFileError(f"{path}: __metadata__ must map names to strings")
    return header, meta


def index_state(path: Path, model, fingerprint: str) -> Header:
    """Check a state file's header against ``model`` (whose fingerprint is given: it is computed once per
    index, not per file) and return what the index keeps.

    Raises :class:`StateFileError` naming the key and what was expected and found.
    """
    tensors, raw_meta = read_header(path)
    cfg = model.config
    found, unknown = layers_by_key(tensors)
    if unknown:
        raise StateFileError(f"{path}: unexpected key(s) {', '.join(sorted(unknown)[:5])}: a state file holds "
                             f"only {WKV_KEY} and optional token-shift vectors (is this a model checkpoint?)")
    has_shift = has_token_shift(found)
    want = layer_shapes(cfg.n_head, cfg.head_size)
    nbytes = 0
    for i in range(cfg.n_layer):
        for pattern in KEYS if has_shift else (WKV_KEY,):
            key = pattern.format(i=i)
            entry = tensors.get(key)
            if not isinstance(entry, dict):
                why = "token-shift vectors must be there for every layer or none" if pattern != WKV_KEY else \
                    f"the model has {cfg.n_layer} layers"
                raise StateFileError(f"{path}: missing {key!r} ({why})")
            dtype, shape = entry.get("dtype"), entry.get("shape")
            if dtype not in FLOAT_DTYPES:
                raise StateFileError(f"{path}: {key}: expected a floating dtype, found {dtype}")
            if shape != want[pattern]:
                raise StateFileError(f"{path}: {key}: expected shape {want[pattern]}, found {shape}")
            nbytes += FLOAT_DTYPES[dtype] * _numel(shape)
    for pattern in KEYS:
        if found[pattern] and max(found[pattern]) >= cfg.n_layer:
            extra = pattern.format(i=max(found[pattern]))
            raise StateFileError(f"{path}: {extra!r} is there, but the model has {cfg.n_layer} layers")
    meta = decode_metadata(raw_meta)
    fp = meta.get("model_fingerprint")
    if fp is not None and fp != fingerprint:
        raise StateFileError(f"{path}: state was trained on a different base model (fingerprint {fp}, this "
                             f"model's is {fingerprint})")
    check_metadata(meta, path, cfg.vocab_size)  # the metadata rules of load_state, so no request meets them
    return Header(meta, nbytes, has_shift)


def index_pth(path: Path, model) -> Header:
    """Index a ``.pth`` state (no header to read alone): read and check it whole with the one state reader."""
    from statetune.tuning.statefile import load_state

    sf = load_state(path, model)
    nbytes = sum(t.numel() * t.element_size() for t in sf.state.tensors()) if sf.has_shift else \
        sf.state.wkv.numel() * sf.state.wkv.element_size()
    return Header(sf.metadata, nbytes, sf.has_shift)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
