"""The work of ``prepare`` on one chunk of records: parse, encode, split, serialize, count.

A chunk is a few thousand consecutive records of one file. ``encode_chunk`` is a plain function of
picklable arguments so that chunks can go to worker processes and come back in order; it never raises for
a bad record but returns the error with the record's line, leaving the stop-or-skip decision to the caller.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import signal
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from statetune.data.fields import RecordError
from statetune.data.formats import Format, Piece, RecordEncoder
from statetune.data.preference import SIDES, PairEncoder
from statetune.data.readers import Item, parse_json_line
from statetune.errors import DataError
from statetune.tokenizer import get_tokenizer

#: How many records over ``--max-len`` (and how many skipped records) are listed by line.
EXAMPLES = 5


@dataclass(frozen=True)
class EncodeConfig:
    """Everything a worker needs to encode records of one file the same way the main process would."""

    tokenizer: str
    format: Format
    eos: tuple[int, ...]
    prompt_template: str | None = None
    completion_template: str | None = None
    val_fraction: float = 0.0
    split_by: str | None = None
    seed: int = 0
    max_len: int | None = None
    style: str | None = None  # preference pairs: "text" or "chat"


@dataclass
class ChunkResult:
    """Serialized output lines of a chunk and what was counted on the way."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    train_tokens: int = 0
    val_tokens: int = 0
    loss_tokens: int = 0
    lengths: Counter[int] = field(default_factory=Counter)
    errors: list[tuple[int, str]] = field(default_factory=list)
    too_long: list[tuple[int, int]] = field(default_factory=list)
    n_too_long: int = 0
    nbytes: int = 0


@functools.lru_cache(maxsize=8)
def _encoder(cfg: EncodeConfig) -> RecordEncoder | PairEncoder:
    if cfg.format is Format.PREFERENCE:
        return PairEncoder(get_tokenizer(cfg.tokenizer), cfg.style or "text", list(cfg.eos),
                           cfg.prompt_template, cfg.completion_template)
    return RecordEncoder(get_tokenizer(cfg.tokenizer), cfg.format, list(cfg.eos),
                         cfg.prompt_template, cfg.completion_template)


def split_key(value: Any) -> str:
    """The text a split decision hashes: the JSON of the value, so ``1`` and ``"1"`` differ."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)


def in_val(key: str, seed: int, fraction: float) -> bool:
    """Whether a record whose split key is ``key`` goes to the validation file (stable across runs)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def encode_chunk(cfg: EncodeConfig, items: list[Item]) -> ChunkResult:
    """Encode a chunk of records: one output JSON line per good record, ``(line, reason)`` per bad one.

    A preference pair counts the tokens of both sides, and its length is that of its longer side."""
    enc = _encoder(cfg)
    encode = enc.tokenizer.encode
    out = ChunkResult()
    for line, payload, nbytes in items:
        out.nbytes += nbytes
        try:
            if isinstance(payload, RecordError):
                raise payload
            record = parse_json_line(payload) if isinstance(payload, bytes) else payload
            pieces = enc.pair(record) if isinstance(enc, PairEncoder) else (enc.pieces(record),)
            sides = [assemble_runs(p, encode) for p in pieces]
            to_val = cfg.val_fraction > 0 and in_val(_split_value(record, cfg), cfg.seed, cfg.val_fraction)
        except RecordError as e:
            out.errors.append((line, e.message))
            continue
        # the first token is never predicted
        losses = [sum(count for bit, count in runs if bit) - runs[0][0] for _, runs in sides]
        if not all(losses):
            side = f"field {SIDES[losses.index(0)]!r}: " if len(sides) == 2 else ""
            out.errors.append((line, f"{side}nothing to learn: no token after the first has mask 1"))
            continue
        # repr of a list of ints is exactly its compact JSON, and a little faster than json.dumps.
        rows = [f'{{"text": {ids!r}, "mask": {mask_json(runs)}}}' for ids, runs in sides]
        row = (rows[0] if len(rows) == 1 else f'{{"chosen": {rows[0]}, "rejected": {rows[1]}}}') + "\n"
        n, length = sum(len(ids) for ids, _ in sides), max(len(ids) for ids, _ in sides)
        if to_val:
            out.val.append(row)
            out.val_tokens += n
        else:
            out.train.append(row)
            out.train_tokens += n
        out.loss_tokens += sum(losses)
        out.lengths[length] += 1
        if cfg.max_len is not None and length > cfg.max_len:
            out.n_too_long += 1
            if len(out.too_long) < EXAMPLES:
                out.too_long.append((line, length))
    return out


def _split_value(record: dict[str, Any], cfg: EncodeConfig) -> str:
    if cfg.split_by is None:
        return json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False)
    if cfg.split_by not in record:
        raise RecordError(cfg.split_by, "missing (named by --split-by)")
    return split_key(record[cfg.split_by])


Runs = list[tuple[int, int]]


def assemble_runs(pieces: Sequence[Piece], encode: Callable[[str], list[int]]) -> tuple[list[int], Runs]:
    """Like ``formats.assemble`` but the mask comes as ``(bit, count)`` runs, which serialize almost free."""
    ids: list[int] = []
    runs: Runs = []
    for content, bits in pieces:
        if isinstance(content, str):
            if content:
                part = encode(content)
                ids += part
                runs.append((bits, len(part)))  # type: ignore[arg-type]
        else:
            ids += content
            runs.extend((bit, sum(1 for _ in group)) for bit, group in groupby(bits))  # type: ignore[arg-type]
    return ids, runs


def mask_json(runs: Sequence[tuple[int, int]]) -> str:
    """The JSON list of a mask given as runs, spaced like ``json.dumps``: ``[0, 0, 1]``."""
    body = "".join(("1, " if bit else "0, ") * count for bit, count in runs)
    return "[" + body[:-2] + "]"


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _quiet_worker() -> None:
    """A worker's signals: Ctrl-C (sent to the whole process group) is the parent's to handle, and SIGTERM,
    with which the parent stops the pool, ends the worker at once. A forked worker would otherwise inherit
    the CLI's handler that turns SIGTERM into ``KeyboardInterrupt`` and print a traceback as it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class ChunkRunner:
    """Runs ``encode_chunk`` in this process or in worker processes, yielding results in input order.

    At most two chunks per worker are in flight, so memory stays bounded however large the input. When the
    run stops early (a bad record, Ctrl-C) the chunks not yet started are cancelled, the few in flight end,
    and the workers exit without a word. (``multiprocessing.Pool.terminate`` can hang for good here: its
    result thread stops reading while a worker is still sending a large result, and the pipe stays full.
    ``ProcessPoolExecutor`` keeps reading until every worker has exited.)
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            # fork starts workers in milliseconds and shares the loaded tokenizer; spawn elsewhere.
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                            initializer=_quiet_worker)

    def map(self, cfg: EncodeConfig, chunks: Iterable[list[Item]]) -> Iterator[ChunkResult]:
        """``encode_chunk(cfg, chunk)`` for each chunk, in order."""
        if self.pool is None:
            for chunk in chunks:
                yield encode_chunk(cfg, chunk)
            return
        pending: deque[Future[ChunkResult]] = deque()
        try:
            for chunk in chunks:
                pending.append(self.pool.submit(encode_chunk, cfg, chunk))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise DataError("a worker process ended unexpectedly (killed by a signal, or out of memory); "
                            "run again, or with fewer --workers") from None

    def __enter__(self) -> ChunkRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
