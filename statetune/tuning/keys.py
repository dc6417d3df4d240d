"""The names a state file uses and the rules its keys follow: tensor keys, the shape each key names, format
tags, metadata decoding, and the in-memory :class:`StateFile`.

Both the full state reader (``tuning/reading.py``) and the header-only index of a server
(``serve/index.py``) take their rules from here, so a file the index accepts is one the reader accepts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from statetune import strict_json
from statetune.errors import StateFileError
from statetune.model.state import RWKVState

FORMAT = "statetune-state/1"
AI00_FORMAT = "ai00-state"
WKV_KEY = "blocks.{i}.att.time_state"
ATT_SHIFT_KEY = "blocks.{i}.att.time_shift"
FFN_SHIFT_KEY = "blocks.{i}.ffn.time_shift"
#: Every key a state file may hold, with the kind of tensor it names.
KEY_PATTERN = re.compile(r"blocks\.(\d+)\.(att\.time_state|att\.time_shift|ffn\.time_shift)")
#: The key templates, WKV first; token-shift vectors are stored for every layer or for none.
KEYS = (WKV_KEY, ATT_SHIFT_KEY, FFN_SHIFT_KEY)
SHIFT_KEYS = (ATT_SHIFT_KEY, FFN_SHIFT_KEY)
#: The longest safetensors header read: a state's is a few KB (metadata included), so anything near this is no
#: state file, and its metadata would be kept in memory for every file a server indexes.
MAX_HEADER = 16 << 20
#: safetensors' names for the floating-point dtypes a state may be stored in, with their sizes in bytes.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def layers_by_key(names: Iterable[str]) -> tuple[dict[str, set[int]], list[str]]:
    """The layer indices a file holds for each key template of :data:`KEYS`, and the names that are no
    state key at all (a state file may hold nothing else)."""
    templates = {t.split(".", 2)[2]: t for t in KEYS}
    found: dict[str, set[int]] = {t: set() for t in KEYS}
    unknown = []
    for name in names:
        m = KEY_PATTERN.fullmatch(str(name))
        if m is None:
            unknown.append(str(name))
        else:
            found[templates[m.group(2)]].add(int(m.group(1)))
    return found, unknown


def has_token_shift(found: dict[str, set[int]]) -> bool:
    """Whether token-shift vectors are stored (for any layer: then they must be there for all)."""
    return any(found[key] for key in SHIFT_KEYS)


def layer_shapes(n_head: int, head_size: int) -> dict[str, list[int]]:
    """The shape each key template names for ``n_head`` heads of ``head_size``: the WKV state
    ``[H, N, N]`` (layout [value, key]) and the token-shift vectors ``[H*N]``."""
    C = n_head * head_size
    return {WKV_KEY: [n_head, head_size, head_size], ATT_SHIFT_KEY: [C], FFN_SHIFT_KEY: [C]}


def decode_metadata(raw: dict[str, str] | None) -> dict[str, Any]:
    """Metadata values as statetune writes them: JSON where they parse as standard JSON, text otherwise (so
    ``NaN`` stays the text it was, never a float)."""
    out: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        try:
            out[k] = strict_json.loads(v)
        except strict_json.StrictJSONError:
            out[k] = v
    return out


@dataclass
class StateFile:
    """A batch-1 state and its metadata; ``has_shift`` says whether token-shift states were stored."""

    state: RWKVState
    metadata: dict[str, Any] = field(default_factory=dict)
    has_shift: bool = False


def check_header_length(path: Any, n: int) -> None:
    """Refuse a safetensors header of ``n`` bytes over :data:`MAX_HEADER` (the index and the reader alike)."""
    if n > MAX_HEADER:
        raise StateFileError(f"{path}: not a safetensors state file (a header of {n:,} bytes; a state's is a few "
                             f"KB, and at most {MAX_HEADER >> 20} MiB is read)")
