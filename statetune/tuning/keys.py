"""The names a state file uses: tensor keys, format tags, and the in-memory :class:`StateFile`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from statetune.model.state import RWKVState

FORMAT = "statetune-state/1"
AI00_FORMAT = "ai00-state"
WKV_KEY = "blocks.{i}.att.time_state"
ATT_SHIFT_KEY = "blocks.{i}.att.time_shift"
FFN_SHIFT_KEY = "blocks.{i}.ffn.time_shift"
#: Every key a state file may hold, with the kind of tensor it names.
KEY_PATTERN = re.compile(r"blocks\.(\d+)\.(att\.time_state|att\.time_shift|ffn\.time_shift)")


@dataclass
class StateFile:
    """A batch-1 state and its metadata; ``has_shift`` says whether token-shift states were stored."""

    state: RWKVState
    metadata: dict[str, Any] = field(default_factory=dict)
    has_shift: bool = False
