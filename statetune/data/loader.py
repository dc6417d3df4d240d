"""Tokenized datasets for training: an index of line offsets, length-bucketed batches, padding.

A multi-GB JSONL file is never held in memory: one pass records each line's byte offset and length
(validating every record), and records are read back by seeking.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from statetune import strict_json
from statetune.errors import DataError


@dataclass
class Example:
    ids: list[int]
    mask: list[int]


def _parse(line: bytes, where: str, vocab_size: int | None) -> Example:
    try:
        rec = strict_json.loads(line)
    except strict_json.StrictJSONError as e:
        raise DataError(f"{where}: {e.msg}") from None
    return record_example(rec, where, vocab_size)


def record_example(rec: object, where: str, vocab_size: int | None) -> Example:
    """The :class:`Example` of one parsed record ``{"text": [ids], "mask": [0/1]}``, validated; a
    :class:`DataError` naming ``where`` otherwise."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    ids = rec.get("text")
    if isinstance(ids, str):
        raise DataError(f"{where}: field 'text' is a string; training reads token ids — run "
                        f"`statetune prepare` on this file first")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise DataError(f"{where}: field 'text' must be a non-empty list of token ids")
    mask = rec.get("mask", [1] * len(ids))
    if not isinstance(mask, list) or len(mask) != len(ids):
        raise DataError(f"{where}: field 'mask' must be a list as long as 'text' ({len(ids)}), "
                        f"got {len(mask) if isinstance(mask, list) else type(mask).__name__}")
    if any(type(m) is not int or m not in (0, 1) for m in mask):  # prepare's rule: 1.0 and true are no mask
        raise DataError(f"{where}: field 'mask' must hold only 0 and 1")
    if vocab_size is not None:
        bad = next((t for t in ids if t < 0 or t >= vocab_size), None)
        if bad is not None:
            raise DataError(f"{where}: field 'text': token id {bad} is outside the model's vocabulary "
                            f"(0..{vocab_size - 1}); was the file prepared with another tokenizer?")
    return Example(ids, mask)


class TokenDataset:
    """Records ``{"text": [ids], "mask": [0/1...]}`` of a JSONL file, read lazily by index."""

    def __init__(self, path: str | Path, vocab_size: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such dataset file")
        self.vocab_size = vocab_size
        offsets, lengths, loss_tokens = [], [], 0
        with self.path.open("rb") as fh:
            pos, lineno = 0, 0
            for line in fh:
                lineno += 1
                if line.strip():
                    ex = _parse(line, f"{self.path}:{lineno}", vocab_size)
                    offsets.append(pos)
                    lengths.append(len(ex.ids))
                    loss_tokens += sum(ex.mask[1:])
                pos += len(line)
        if not offsets:
            raise DataError(f"{self.path}: the dataset is empty")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.loss_tokens = loss_tokens
        self._fh = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Example:
        if self._fh is None:
            self._fh = self.path.open("rb")
        self._fh.seek(int(self.offsets[i]))
        return _parse(self._fh.readline(), f"{self.path}: record {i}", None)

    def __getstate__(self):  # file handles do not pickle
        d = dict(self.__dict__)
        d["_fh"] = None
        return d


def global_batches(lengths: np.ndarray, global_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's global batches, length-bucketed: shuffle, sort within pools of 50 batches by length,
    cut, and shuffle the batch order. A pure function of ``(seed, epoch)``, so a resumed run sees the
    same batches."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    pool = global_size * 50
    batches = []
    for start in range(0, len(perm), pool):
        chunk = perm[start:start + pool]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + global_size].tolist() for i in range(0, len(chunk), global_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def micro_batches(batch: list[int], lengths: np.ndarray, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: sorted by length, cut into ``batch_size`` groups,
    dealt round-robin to ranks."""
    ordered = sorted(batch, key=lambda i: (-int(lengths[i]), i))
    groups = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    return groups[rank::world]


def collate(examples: list[Example], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Right-pad to the longest: ``tokens [B, L]`` (pad id 0) and ``mask [B, L]`` (0 on padding)."""
    L = max(len(e.ids) for e in examples)
    tokens = torch.zeros(len(examples), L, dtype=torch.long)
    mask = torch.zeros(len(examples), L, dtype=torch.bool)
    for b, e in enumerate(examples):
        tokens[b, :len(e.ids)] = torch.tensor(e.ids)
        mask[b, :len(e.mask)] = torch.tensor(e.mask, dtype=torch.bool)
    return tokens.to(device), mask.to(device)
