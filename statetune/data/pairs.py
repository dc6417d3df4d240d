"""The prepared preference pairs `train --objective dpo|orpo` reads: pairs of records sharing their prompt.

Each JSONL line is ``{"chosen": {"text": [ids], "mask": [0/1]}, "rejected": {"text": [ids], "mask": [0/1]}}``:
each side a full tokenized record (prompt and completion, mask 1 on the completion), validated as
:class:`~statetune.data.loader.TokenDataset` validates a record, and each side needs a loss token. The
``.meta.json`` beside the file says ``"kind": "preference"``. Like ``TokenDataset``, the file is indexed by
byte offsets in one pass and records are read back by seeking.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from statetune import strict_json
from statetune.data.loader import Example, record_example
from statetune.errors import DataError

PREFERENCE = "preference"
SFT = "sft"


@dataclass
class Pair:
    """One preference pair: the preferred and the dispreferred record."""

    chosen: Example
    rejected: Example


def _parse_pair(line: bytes, where: str, vocab_size: int | None) -> Pair:
    try:
        rec = strict_json.loads(line)
    except strict_json.StrictJSONError as e:
        raise DataError(f"{where}: {e.msg}") from None
    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        raise DataError(f"{where}: expected an object with 'chosen' and 'rejected' records (a preference pair)")
    sides = []
    for side in ("chosen", "rejected"):
        ex = record_example(rec[side], f"{where}: '{side}'", vocab_size)
        if not any(ex.mask[1:]):
            raise DataError(f"{where}: '{side}' has no loss token (its mask is 0 after the first token)")
        sides.append(ex)
    return Pair(*sides)


class PreferenceDataset:
    """Preference pairs of a JSONL file, read lazily by index; ``lengths`` is the longer side of each pair."""

    def __init__(self, path: str | Path, vocab_size: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such dataset file")
        offsets, lengths, chosen_lengths, loss_tokens = [], [], [], 0
        with self.path.open("rb") as fh:
            pos = 0
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    pair = _parse_pair(line, f"{self.path}:{lineno}", vocab_size)
                    offsets.append(pos)
                    lengths.append(max(len(pair.chosen.ids), len(pair.rejected.ids)))
                    chosen_lengths.append(len(pair.chosen.ids))
                    loss_tokens += sum(pair.chosen.mask[1:])
                pos += len(line)
        if not offsets:
            raise DataError(f"{self.path}: the dataset is empty")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.loss_tokens = loss_tokens  # the chosen sides' (what the next-token loss on chosen counts)
        self.chosen = ChosenView(self, np.asarray(chosen_lengths, dtype=np.int64))
        self._fh = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Pair:
        if self._fh is None:
            self._fh = self.path.open("rb")
        self._fh.seek(int(self.offsets[i]))
        return _parse_pair(self._fh.readline(), f"{self.path}: record {i}", None)

    def __getstate__(self):  # file handles do not pickle
        return {**self.__dict__, "_fh": None}


class ChosenView:
    """The chosen sides of a preference dataset as a record dataset (the next-token loss on the chosen
    completions, sample generations from their prompts)."""

    def __init__(self, pairs: PreferenceDataset, lengths: np.ndarray):
        self.pairs, self.lengths, self.path = pairs, lengths, pairs.path
        self.loss_tokens = pairs.loss_tokens

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Example:
        return self.pairs[i].chosen


def data_kind(path: str | Path, meta: dict) -> str:
    """``"preference"`` or ``"sft"``: the ``kind`` in the file's ``.meta.json``, else what its first record
    looks like (an object with ``chosen`` and ``rejected``)."""
    if meta.get("kind") in (PREFERENCE, SFT):
        return meta["kind"]
    try:
        with Path(path).open("rb") as fh:
            first = next((line for line in fh if line.strip()), b"")
        rec = strict_json.loads(first) if first else None
    except (OSError, strict_json.StrictJSONError):
        return SFT  # the record loader reports what is wrong with the file
    return PREFERENCE if isinstance(rec, dict) and "chosen" in rec and "rejected" in rec else SFT
