"""Tokenizing JSONL/CSV datasets into the ``{"text": ids, "mask": 0/1}`` training files (``statetune prepare``).

Inputs stream through in chunks (in worker processes on large inputs, results written back in order);
everything goes to temporary files that replace ``OUT.jsonl``, ``OUT.val.jsonl`` and ``OUT.meta.json`` only
when the whole run succeeded, so a bad record never leaves a half-written dataset behind.
"""

from __future__ import annotations

import enum
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from statetune.data.fields import RecordError, field_names
from statetune.data.formats import DETECTABLE, Format, detect_format, resolve_eos
from statetune.data.outputs import Outputs
from statetune.data.pipeline import ChunkRunner, EncodeConfig, cpu_count
from statetune.data.preference import preference_style
from statetune.data.readers import Item, parse_json_line, read_items
from statetune.data.report import InputReport, Totals, build_meta, require_records, summary
from statetune.errors import CheckpointError, DataError, OptionError
from statetune.outpaths import check_output
from statetune.tokenizer import Tokenizer, get_tokenizer, tokenizer_name_for_vocab

CHUNK_ITEMS = 2000
CHUNK_BYTES = 1 << 20
#: Below this much input, worker processes cost more than they save.
PARALLEL_MIN_BYTES = 8 << 20


class TokenizerChoice(enum.StrEnum):
    """``--tokenizer``: a tokenizer by name, or ``auto`` to follow ``--model``."""

    AUTO = "auto"
    WORLD = "world"
    BYTES = "bytes"


@dataclass(frozen=True)
class PrepareSettings:
    """How records become training lines (templates already unescaped); see ``statetune prepare --help``."""

    format: Format = Format.AUTO
    prompt_template: str | None = None
    completion_template: str | None = None
    eos: str | None = None
    val_fraction: float = 0.0
    split_by: str | None = None
    seed: int = 0
    max_len: int | None = None
    skip_invalid: bool = False
    workers: int = 0


def check_paths(inputs: list[Path], outputs: tuple[Path, Path | None, Path]) -> None:
    """Usage errors for a missing input, or an output that would overwrite an input."""
    for p in inputs:
        if not p.is_file():
            raise OptionError(f"INPUTS: no such file: {p}")
    for out in filter(None, outputs):
        check_output(out, "--out", [("INPUTS", p) for p in inputs])


def prepare_dataset(inputs: list[Path], outputs: tuple[Path, Path | None, Path], tokenizer: Tokenizer,
                    settings: PrepareSettings) -> None:
    """Tokenize ``inputs`` into ``outputs`` (train JSONL, validation JSONL or None, meta JSON), all replaced
    together only when the whole run succeeded; prints the summary to stderr (call :func:`check_paths` first)."""
    start = time.perf_counter()
    train_path, val_path, meta_path = outputs
    total_bytes = sum(p.stat().st_size for p in inputs)
    workers = settings.workers or (cpu_count() if total_bytes >= PARALLEL_MIN_BYTES else 1)
    totals, reports = Totals(), [InputReport(str(p)) for p in inputs]
    paths = {"train": str(train_path), "val": str(val_path) if val_path else None, "meta": str(meta_path)}
    names = {"train": train_path.name, "val": val_path.name if val_path else None}
    with Outputs(train_path, val_path, meta_path) as files, ChunkRunner(workers) as runner, \
            _progress(total_bytes) as bar:
        for path, report in zip(inputs, reports, strict=True):
            _prepare_file(path, settings, tokenizer, runner, files, totals, report, bar)
            _check_kinds(reports)
        require_records(totals, inputs, settings.val_fraction, settings.split_by)
        meta = build_meta(
            tokenizer=tokenizer, inputs=reports, totals=totals, outputs=names,
            prompt_template=settings.prompt_template, completion_template=settings.completion_template,
            eos_option=settings.eos, val_fraction=settings.val_fraction, split_by=settings.split_by,
            seed=settings.seed, max_len=settings.max_len)
        files.meta.write(json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        files.commit()
    unit = "pairs" if meta["kind"] == "preference" else "records"
    print(summary(totals, paths, settings.max_len, time.perf_counter() - start, total_bytes, unit), file=sys.stderr)


def resolve_tokenizer(choice: TokenizerChoice | str, model: str | None) -> Tokenizer:
    """The tokenizer named by ``--tokenizer``, checked against (or, for auto, taken from) ``--model``."""
    choice = TokenizerChoice(choice)
    if model is None:
        return get_tokenizer("world" if choice is TokenizerChoice.AUTO else choice.value)
    from statetune.model.checkpoint import read_vocab_size

    try:
        vocab_size = read_vocab_size(model)
        name = tokenizer_name_for_vocab(vocab_size)
    except CheckpointError as e:
        raise OptionError(f"--model: {e}") from None
    if choice is not TokenizerChoice.AUTO and choice.value != name:
        raise OptionError(f"--tokenizer: {choice.value} does not fit --model {model}, whose vocabulary has "
                          f"{vocab_size} tokens ({name} tokenizer)")
    return get_tokenizer(name)


def _prepare_file(path: Path, opts: PrepareSettings, tokenizer: Tokenizer, runner: ChunkRunner,
                  files: Outputs, totals: Totals, report: InputReport, bar: Any) -> None:
    """Detect the file's format (unless forced), then encode it chunk by chunk into the outputs."""
    items = read_items(path)
    fmt: Format | None = opts.format
    style: str | None = None
    seen = 0
    if fmt in (Format.AUTO, Format.PREFERENCE):  # preference pairs: the first one also sets the style
        found = None
        for item in items:
            seen += 1
            found = _detect(item, path, opts, totals, report)
            if found is not None:
                items = chain([item], items)
                break
            bar.update(item[2])
        if found is None:
            if not seen:
                raise DataError(f"{path}: empty file: no records")
            return  # every record was invalid, and skipped
        fmt, style = found
    if fmt is Format.PREFERENCE:
        eos, eos_text = resolve_eos(Format.CHAT if style == "chat" else Format.PROMPT_COMPLETION, opts.eos, tokenizer)
    else:
        eos, eos_text = resolve_eos(fmt, opts.eos, tokenizer)
    report.format, report.style, report.eos, report.eos_text = fmt, style, eos, eos_text
    cfg = EncodeConfig(
        tokenizer=tokenizer.name, format=fmt, eos=tuple(eos),
        prompt_template=opts.prompt_template, completion_template=opts.completion_template,
        val_fraction=opts.val_fraction,
        split_by=opts.split_by, seed=opts.seed, max_len=opts.max_len, style=style)
    counted = _Counted(items)
    for result in runner.map(cfg, _chunks(counted)):
        for line, message in result.errors:
            message = f"{path}:{line}: {message}"
            if not opts.skip_invalid:
                raise DataError(message)
            totals.skip(message, report)
        files.write(result)
        totals.add(str(path), result, report)
        bar.update(result.nbytes)
    if not seen and not counted.n:
        raise DataError(f"{path}: empty file: no records")


def _detect(item: Item, path: Path, opts: PrepareSettings, totals: Totals,
            report: InputReport) -> tuple[Format, str | None] | None:
    """The format (and preference style) of the file's first valid record; earlier invalid records stop the
    run or are skipped. Templates without ``--format`` mean the template format unless records are pairs."""
    line, payload, _ = item
    templated = opts.prompt_template is not None or opts.completion_template is not None
    try:
        if isinstance(payload, RecordError):
            raise payload
        record = parse_json_line(payload) if isinstance(payload, bytes) else payload
        fmt = Format.PREFERENCE if opts.format is Format.PREFERENCE else detect_format(record)
        if fmt is Format.PREFERENCE:
            style = preference_style(record)
            if style == "chat" and templated:
                raise OptionError(f"--prompt-template/--completion-template: {path} holds chat pairs (lists of "
                                  "messages), which take no templates")
            return fmt, style
        if templated:  # with --completion-template (checked by the options)
            return Format.TEMPLATE, None
        if fmt is None:
            raise RecordError("record", f"cannot tell the format from {field_names(record)}; expected "
                                        f"{DETECTABLE} (or set --format or --completion-template)")
        return fmt, None
    except RecordError as e:
        message = f"{path}:{line}: {e.message}"
        if not opts.skip_invalid:
            raise DataError(message) from None
        totals.skip(message, report)
        return None


def _check_kinds(reports: list[InputReport]) -> None:
    """Preference pairs and SFT records never go into one output: the trainer reads one kind per file."""
    kinds = {(r.format is Format.PREFERENCE): r.path for r in reports if r.format is not None}
    if len(kinds) == 2:
        raise DataError(f"{kinds[False]} holds SFT records and {kinds[True]} preference pairs; prepare them "
                        "into separate outputs")


class _Counted:
    """An iterator that counts the items it hands out."""

    def __init__(self, items: Iterable[Item]) -> None:
        self._it = iter(items)
        self.n = 0

    def __iter__(self) -> Iterator[Item]:
        for item in self._it:
            self.n += 1
            yield item


def _chunks(items: Iterable[Item]) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    size = 0
    for item in items:
        chunk.append(item)
        size += item[2]
        if len(chunk) >= CHUNK_ITEMS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _progress(total_bytes: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", file=sys.stderr, leave=False,
                disable=total_bytes < PARALLEL_MIN_BYTES or not sys.stderr.isatty())
