"""``statetune prepare``: tokenize JSONL/CSV datasets into the ``{"text": ids, "mask": 0/1}`` training files.

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
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from statetune.data.fields import RecordError, Template, field_names, unescape
from statetune.data.formats import DETECTABLE, Format, detect_format, resolve_eos
from statetune.data.outputs import Outputs
from statetune.data.pipeline import ChunkRunner, EncodeConfig, cpu_count
from statetune.data.readers import Item, parse_json_line, read_items
from statetune.data.report import InputReport, Totals, build_meta, require_records, summary
from statetune.errors import CheckpointError, DataError, OptionError
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


@dataclass
class PrepareOptions:
    """Tokenize JSONL/CSV datasets into {"text": [ids], "mask": [0/1...]} lines for training.

    The format of each file is detected from its first record (text, tokenized, prompt/completion,
    input/output, instruction, chat messages) or set with --format; --prompt-template and
    --completion-template read any fields. See docs/prepare.md.
    """

    inputs: list[str] = field(metadata={"positional": True, "help": "JSONL, CSV or TSV files to tokenize."})
    out: str = field(metadata={"help": "Output name: writes OUT.jsonl, OUT.meta.json (and OUT.val.jsonl)."})
    format: Format = field(default=Format.AUTO, metadata={
        "help": "Record format; auto detects it per file from the first valid record."})
    tokenizer: TokenizerChoice = field(default=TokenizerChoice.AUTO, metadata={
        "help": "Tokenizer; auto takes it from --model's vocabulary size, else world."})
    model: str | None = field(default=None, metadata={
        "help": "Model checkpoint (.pth/.safetensors) whose vocabulary picks the tokenizer."})
    prompt_template: str | None = field(default=None, metadata={
        "help": r"Prompt (no loss) from record fields, e.g. 'Input: {mr}\n\nResponse:' (\n is a newline)."})
    completion_template: str | None = field(default=None, metadata={
        "help": "Completion (loss) from record fields, e.g. ' {ref}'."})
    eos: str | None = field(default=None, metadata={
        "help": "Appended after each completion: none, a token id, or text. Default: 0 (end of text) for "
                "completion formats, nothing for text and chat (turns end with a blank line)."})
    val_fraction: float = field(default=0.0, metadata={
        "help": "Fraction of records for OUT.val.jsonl (deterministic by hash)."})
    split_by: str | None = field(default=None, metadata={
        "help": "Field whose value keeps records together on one side of the split."})
    seed: int = field(default=0, metadata={"help": "Seed of the train/validation split."})
    max_len: int | None = field(default=None, metadata={
        "help": "Report records longer than this many tokens (they are kept whole, never truncated)."})
    skip_invalid: bool = field(default=False, metadata={
        "help": "Skip invalid records (counted and listed) instead of stopping at the first one."})
    workers: int = field(default=0, metadata={
        "help": "Tokenizing processes; 0 = one per CPU core on inputs over 8 MB, else 1."})

    def __post_init__(self) -> None:
        try:
            self.format = Format(self.format)
        except ValueError:
            raise OptionError(f"--format: unknown format {self.format!r} "
                              f"(choose from {', '.join(f.value for f in Format)})") from None
        try:
            self.tokenizer = TokenizerChoice(self.tokenizer)
        except ValueError:
            raise OptionError(f"--tokenizer: unknown tokenizer {self.tokenizer!r} "
                              f"(choose from {', '.join(t.value for t in TokenizerChoice)})") from None
        if not self.inputs:
            raise OptionError("INPUTS: give at least one dataset file")
        if not 0.0 <= self.val_fraction < 1.0:
            raise OptionError(f"--val-fraction: must be in [0, 1), got {self.val_fraction}")
        if self.split_by is not None and self.val_fraction == 0.0:
            raise OptionError("--split-by: only meaningful with --val-fraction above 0")
        if self.max_len is not None and self.max_len < 1:
            raise OptionError(f"--max-len: must be at least 1, got {self.max_len}")
        if self.workers < 0:
            raise OptionError(f"--workers: must be 0 (auto) or more, got {self.workers}")
        if self.prompt_template is not None or self.completion_template is not None:
            if self.format not in (Format.AUTO, Format.TEMPLATE):
                raise OptionError(f"--prompt-template/--completion-template: only with --format template, "
                                  f"not {self.format.value}")
            self.format = Format.TEMPLATE
        if self.format is Format.TEMPLATE and self.completion_template is None:
            raise OptionError("--completion-template: required with --format template or --prompt-template")
        for value, flag in ((self.prompt_template, "--prompt-template"),
                            (self.completion_template, "--completion-template")):
            if value is not None:
                Template(unescape(value), flag)

    def output_paths(self) -> tuple[Path, Path | None, Path]:
        """``OUT.jsonl``, ``OUT.val.jsonl`` (None without a split) and ``OUT.meta.json``."""
        base = self.out[: -len(".jsonl")] if self.out.endswith(".jsonl") else self.out
        val = Path(base + ".val.jsonl") if self.val_fraction > 0 else None
        return Path(base + ".jsonl"), val, Path(base + ".meta.json")


def prepare(opts: PrepareOptions) -> int:
    """Tokenize ``opts.inputs`` into ``OUT.jsonl`` (+ ``OUT.val.jsonl``) and ``OUT.meta.json``; returns 0."""
    start = time.perf_counter()
    paths = [Path(p) for p in opts.inputs]
    for p in paths:
        if not p.is_file():
            raise OptionError(f"INPUTS: no such file: {p}")
    train_path, val_path, meta_path = opts.output_paths()
    for out in filter(None, (train_path, val_path, meta_path)):
        if any(out.resolve() == p.resolve() for p in paths):
            raise OptionError(f"--out: {out} is also an input; choose another output name")
    tokenizer = resolve_tokenizer(opts.tokenizer, opts.model)
    total_bytes = sum(p.stat().st_size for p in paths)
    workers = opts.workers or (cpu_count() if total_bytes >= PARALLEL_MIN_BYTES else 1)
    totals, reports = Totals(), [InputReport(str(p)) for p in paths]
    outputs = {"train": str(train_path), "val": str(val_path) if val_path else None, "meta": str(meta_path)}
    names = {"train": train_path.name, "val": val_path.name if val_path else None}
    with Outputs(train_path, val_path, meta_path) as files, ChunkRunner(workers) as runner, \
            _progress(total_bytes) as bar:
        for path, report in zip(paths, reports, strict=True):
            _prepare_file(path, opts, tokenizer, runner, files, totals, report, bar)
        require_records(totals, paths, opts.val_fraction, opts.split_by)
        meta = build_meta(
            tokenizer=tokenizer, inputs=reports, totals=totals, outputs=names,
            prompt_template=_unescaped(opts.prompt_template),
            completion_template=_unescaped(opts.completion_template), eos_option=opts.eos,
            val_fraction=opts.val_fraction, split_by=opts.split_by, seed=opts.seed, max_len=opts.max_len)
        files.meta.write(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        files.commit()
    print(summary(totals, outputs, opts.max_len, time.perf_counter() - start, total_bytes), file=sys.stderr)
    return 0


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


def _unescaped(template: str | None) -> str | None:
    return None if template is None else unescape(template)


def _prepare_file(path: Path, opts: PrepareOptions, tokenizer: Tokenizer, runner: ChunkRunner,
                  files: Outputs, totals: Totals, report: InputReport, bar: Any) -> None:
    """Detect the file's format (unless forced), then encode it chunk by chunk into the outputs."""
    items = read_items(path)
    fmt: Format | None = opts.format
    seen = 0
    if fmt is Format.AUTO:
        fmt = None
        for item in items:
            seen += 1
            fmt = _detect(item, path, opts.skip_invalid, totals, report)
            if fmt is not None:
                items = chain([item], items)
                break
            bar.update(item[2])
        if fmt is None:
            if not seen:
                raise DataError(f"{path}: empty file: no records")
            return  # every record was invalid, and skipped
    eos, eos_text = resolve_eos(fmt, opts.eos, tokenizer)
    report.format, report.eos, report.eos_text = fmt, eos, eos_text
    cfg = EncodeConfig(
        tokenizer=tokenizer.name, format=fmt, eos=tuple(eos),
        prompt_template=_unescaped(opts.prompt_template),
        completion_template=_unescaped(opts.completion_template), val_fraction=opts.val_fraction,
        split_by=opts.split_by, seed=opts.seed, max_len=opts.max_len)
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


def _detect(item: Item, path: Path, skip: bool, totals: Totals, report: InputReport) -> Format | None:
    """The format of the file's first valid record; earlier invalid records stop the run or are skipped."""
    line, payload, _ = item
    try:
        if isinstance(payload, RecordError):
            raise payload
        record = parse_json_line(payload) if isinstance(payload, bytes) else payload
        fmt = detect_format(record)
        if fmt is None:
            raise RecordError("record", f"cannot tell the format from {field_names(record)}; expected "
                                        f"{DETECTABLE} (or set --format or --completion-template)")
        return fmt
    except RecordError as e:
        message = f"{path}:{line}: {e.message}"
        if not skip:
            raise DataError(message) from None
        totals.skip(message, report)
        return None


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
